"""Benchmark: what non-IID data costs a federation. The same pooled data (the default simulation's 5 phantom
hospitals × 600 images, one patient per image) split into 5 hospitals IID and by Dirichlet label skew (α = 1.0,
0.3, 0.1 over the label combination) with ``retune simulate --data --partition``, and by its natural ``hospital``
column (five scanner styles) for reference; every hospital labels every disease. With the default 2 local epochs
per round and with 10 (more local work, where client drift shows). Per partition, local epochs and seed: the final
federated macro-AUROC (exact, on the hospitals' test data) against the centralized baseline of the same run (pooled
training on the same stage data, same epoch budget), and the partition's label skew (mean total-variation distance
between a hospital's label-combination distribution and the pooled one).

Not a test; writes bench/results/partitions.json.

Usage: .venv/bin/python bench/partitions.py [--seeds 0 1 2] [--local-epochs 2 10] [--out bench/results/partitions.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from rich.console import Console  # noqa: E402

from deploy.sim_data import prepare_data, write_phantoms  # noqa: E402
from deploy.simulate import HOSPITALS_DIR, run_simulation, simulation_config  # noqa: E402
from shared.config import SimulationData, SimulationPlan  # noqa: E402

HOSPITALS = 5
PARTITIONS = ("natural", "iid", "dirichlet:1.0", "dirichlet:0.3", "dirichlet:0.1")


def label_skew(partition: dict) -> float:
    """Mean total-variation distance between each hospital's label-combination distribution and the pooled one,
    read back from the hospitals' own manifests."""
    frames = [pd.read_csv(h, dtype={"patient": str}) for h in partition["manifests"]]
    diseases = partition["diseases"]
    combos = [f[diseases].fillna(0).astype(int).astype(str).agg("".join, axis=1) for f in frames]
    pooled = pd.concat(combos).value_counts(normalize=True)
    return float(np.mean([0.5 * c.value_counts(normalize=True).sub(pooled, fill_value=0).abs().sum()
                          for c in combos]))


def run(root: Path, pooled: Path, partition: str, seed: int, local_epochs: int) -> dict:
    out = root / f"{partition.replace(':', '-')}-e{local_epochs}-seed-{seed}"
    data = SimulationData(str(pooled), partition=partition)
    plan = SimulationPlan(hospitals=HOSPITALS, cache_dir=str(root / "cache"), data=data)
    config = simulation_config(out, HOSPITALS, seed=seed, diseases="chexpert5", local_epochs=local_epochs)
    quiet = Console(stderr=True, quiet=True)
    made = prepare_data(out / HOSPITALS_DIR, plan, seed, quiet)
    start = time.perf_counter()
    report = run_simulation(config, plan, quiet, data=made)
    federated, centralized = report["final"]["exact_macro_auroc"], report["baselines"]["centralized"]["macro_auroc"]
    return {"federated": federated, "centralized": centralized, "gap": centralized - federated,
            "zero_shot": report["baselines"]["zero_shot"]["macro_auroc"],
            "label_skew": label_skew({"manifests": [h.manifest for h in made.hospitals],
                                      "diseases": list(made.diseases)}),
            "images": report["partition"]["images"], "wall_s": round(time.perf_counter() - start, 1)}


def summary(runs: list[dict]) -> dict:
    return {k: {"mean": round(float(np.mean([r[k] for r in runs])), 4),
                "std": round(float(np.std([r[k] for r in runs])), 4)}
            for k in ("federated", "centralized", "gap", "label_skew")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--partitions", nargs="+", default=list(PARTITIONS))
    parser.add_argument("--local-epochs", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--out", type=Path, default=Path("bench/results/partitions.json"))
    args = parser.parse_args()
    result: dict = {"hospitals": HOSPITALS, "images_per_hospital": SimulationPlan().images_per_hospital,
                    "seeds": args.seeds, "settings": "retune simulate defaults (2 stages x 3 rounds, FedAvg, "
                    "data-incremental) with each --local-epochs; every hospital labels every disease", "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pooled = write_phantoms(root / "phantoms", SimulationPlan(hospitals=HOSPITALS), 0, Console(quiet=True))
        for epochs in args.local_epochs:
            for partition in args.partitions:
                key = f"{partition}/local-epochs-{epochs}"
                runs = [run(root, pooled, partition, seed, epochs) for seed in args.seeds]
                result["runs"][key] = {"runs": runs, "summary": summary(runs)}
                print(key, json.dumps(result["runs"][key]["summary"]), file=sys.stderr)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
