"""Benchmark: RE-tune adaptors vs LoRA in the backbone (PeFoMed's settings) vs both, federated on the
``retune simulate`` defaults (5 phantom hospitals, 600 images each, 2 data-incremental stages × 3 rounds, 2 local
epochs), over seeds; plus the same with DP-SGD (ε = 8) at every hospital for each kind.

Per kind: final macro-AUROC, forgetting, zero-shot and centralized baselines (the centralized one trains the same
kind), trainable parameters, bytes per hospital per round (up), seconds per round.

Not a test; writes bench/results/adaptor_kinds.json.

Usage: .venv/bin/python bench/adaptor_kinds.py [--seeds 0 1 2] [--dp-epsilon 8] [--out bench/results/adaptor_kinds.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402

from deploy.report import headline  # noqa: E402
from deploy.simulate import HOSPITALS_DIR, run_simulation, simulation_config  # noqa: E402
from shared.config import ADAPTOR_KINDS, SimulationPlan  # noqa: E402

HOSPITALS = 5


def run(root: Path, kind: str, seed: int, dp_epsilon: float | None) -> dict:
    out = root / f"{kind}-seed-{seed}-{'dp' if dp_epsilon else 'plain'}"
    config = simulation_config(out, HOSPITALS, seed=seed, adaptor_kind=kind)
    # The same images for every kind; DP runs get hospitals of their own, whose ε ledgers start empty (a ledger
    # spans all runs at a hospital: a second DP run there would find the budget spent).
    hospitals = f"seed-{seed}" if not dp_epsilon else f"dp-{kind}-seed-{seed}"
    config = dataclasses.replace(config, sim_dir=str(root / hospitals / HOSPITALS_DIR))
    plan = SimulationPlan(hospitals=HOSPITALS, cache_dir=str(root / "cache"), dp_epsilon=dp_epsilon)
    start = time.perf_counter()
    report = run_simulation(config, plan, Console(stderr=True, quiet=True))
    rounds = report["rounds"]
    return {**headline(report),
            "trainable_parameters": report["adaptors"]["trainable_parameters"],
            "bytes_up_per_hospital_per_round": rounds[-1]["bytes_up"] // HOSPITALS,
            "seconds_per_round": report["timing"]["seconds_per_round"],
            "run_s": time.perf_counter() - start,
            **({"epsilon_max": max(report["privacy"]["epsilon"].values())} if dp_epsilon else {})}


def summary(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if values:
            out[key] = {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kinds", nargs="+", default=list(ADAPTOR_KINDS))
    parser.add_argument("--dp-epsilon", type=float, default=8.0, help="0: skip the DP runs")
    parser.add_argument("--out", type=Path, default=Path("bench/results/adaptor_kinds.json"))
    args = parser.parse_args()
    result: dict = {"hospitals": HOSPITALS, "seeds": args.seeds, "kinds": {}}
    if args.out.exists():  # other kinds measured before (--kinds runs some of them)
        result["kinds"] = json.loads(args.out.read_text())["kinds"]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            runs = [run(Path(tmp), kind, seed, None) for seed in args.seeds]
            entry = {"runs": runs, "summary": summary(runs)}
            if args.dp_epsilon:
                dp = [run(Path(tmp), kind, seed, args.dp_epsilon) for seed in args.seeds[:1]]
                entry["dp"] = {"epsilon_budget": args.dp_epsilon, "runs": dp}
            result["kinds"][kind] = entry
            print(kind, json.dumps(entry["summary"]), file=sys.stderr)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
