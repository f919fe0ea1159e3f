"""Benchmark: does the federation learn what pooled training learns, keep what it learnt, and does the compact
wire change it? 5 non-IID phantom hospitals, 5 data-incremental stages × 3 rounds, over 3 seeds:

- federated vs centralized macro-AUROC (pooled training on the same stage data with the same epoch budget), and
  forgetting over the stages (mean drop from the best AUROC on an earlier stage's test data to the final one);
- the same runs with the adaptors on the wire in float32 instead of float16: the change in final macro-AUROC;
- bytes per hospital per round each way (measured in the runs, at this backbone's d, and computed by the wire's
  own encoder at d = 512, BiomedCLIP's), against full-model federated learning of BiomedCLIP (≈ 196 M parameters:
  784 MB in float32).

Not a test; writes bench/results/learning.json.

Usage: .venv/bin/python bench/learning.py [--seeds 0 1 2] [--stages 5] [--out bench/results/learning.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402

from deploy.report import headline  # noqa: E402
from deploy.simulate import HOSPITALS_DIR, run_simulation, simulation_config  # noqa: E402
from shared.config import SimulationPlan  # noqa: E402
from shared.model import RetuneModel  # noqa: E402
from shared.wire import payload_bytes, to_record  # noqa: E402

BIOMEDCLIP_FULL_MODEL_BYTES = 784_000_000
HOSPITALS = 5


def run(root: Path, seed: int, stages: int, wire_dtype: str) -> dict:
    out = root / f"seed-{seed}-{wire_dtype}"
    config = simulation_config(out, HOSPITALS, stages=stages, seed=seed, wire_dtype=wire_dtype)
    config = dataclasses.replace(config, sim_dir=str(root / f"seed-{seed}" / HOSPITALS_DIR))  # same images
    plan = SimulationPlan(hospitals=HOSPITALS, cache_dir=str(root / "cache"))
    report = run_simulation(config, plan, Console(stderr=True, quiet=True))
    rounds = report["rounds"]
    return {**headline(report),
            "bytes_up_per_hospital": rounds[-1]["bytes_up"] // HOSPITALS,
            "bytes_down_per_hospital_first_round": rounds[0]["bytes_down"] // HOSPITALS,
            "bytes_down_per_hospital_later_rounds": rounds[-1]["bytes_down"] // HOSPITALS}


def spread(values: list[float]) -> dict:
    return {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4),
            "min": round(float(np.min(values)), 4), "max": round(float(np.max(values)), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stages", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/learning.json"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="learning-"))
    runs = {}
    for seed in args.seeds:
        for wire_dtype in ("float16", "float32"):
            runs[f"{seed}/{wire_dtype}"] = run(root, seed, args.stages, wire_dtype)
            print(seed, wire_dtype, json.dumps(runs[f"{seed}/{wire_dtype}"]), flush=True)
    ours = [runs[f"{s}/float16"] for s in args.seeds]
    at_512 = {dtype: payload_bytes(to_record(RetuneModel(512), dtype)) for dtype in ("float16", "float32")}
    result = {
        "machine": {"cpus": os.cpu_count()}, "hospitals": HOSPITALS, "stages": args.stages, "seeds": args.seeds,
        "runs": runs,
        "gap_centralized_minus_federated": spread([r["centralized"] - r["final_macro_auroc"] for r in ours]),
        "forgetting": spread([r["forgetting"] for r in ours]),
        "federated": spread([r["final_macro_auroc"] for r in ours]),
        "centralized": spread([r["centralized"] for r in ours]),
        "wire_float16_minus_float32": spread([runs[f"{s}/float16"]["final_macro_auroc"]
                                              - runs[f"{s}/float32"]["final_macro_auroc"] for s in args.seeds]),
        "bytes_at_d512": {
            "before_float32_up": at_512["float32"], "before_float32_down": 2 * at_512["float32"],
            "after_float16_up": at_512["float16"], "after_float16_down": at_512["float16"],
            "full_model_biomedclip": BIOMEDCLIP_FULL_MODEL_BYTES,
            "ratio_full_model_to_after_up": round(BIOMEDCLIP_FULL_MODEL_BYTES / at_512["float16"], 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
