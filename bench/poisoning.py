"""Benchmark: one poisoned hospital against each strategy. Not a test; writes bench/results/poisoning.json.

Every run is ``retune simulate`` on its defaults (5 phantom hospitals, 2 stages × 3 rounds), the same hospitals and
embedding cache for all runs. Clean runs (every strategy, to show each learns above zero-shot) and runs where
hospital K sends poisoned adaptors in every train reply (``--poison KIND:K``, testing only) with a round counting
from 4 updates, so a refused hospital does not stop it. ``scale`` is also run with containment off
(``max-update-norm 0``) to show what plain FedAvg loses without it.

Usage: .venv/bin/python bench/poisoning.py [--hospital 1] [--only fedavg,krum] [--out bench/results/poisoning.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from shared.config import STRATEGIES, SimulationPlan

#: (strategy, poison kind or "" for clean, max-update-norm override or None)
RUNS = [*((s, "", None) for s in STRATEGIES),
        *((s, "flip", None) for s in ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")),
        ("fedavg", "scale", None), ("fedavg", "scale", 0.0), ("fedmedian", "scale", None),
        ("fedavg", "nan", None), ("fedmedian", "nan", None)]


def run(strategy: str, kind: str, norm: float | None, hospital: int, root: Path, shared: Path) -> dict:
    from deploy.simulate import run_simulation, simulation_config

    plan = SimulationPlan(poison=f"{kind}:{hospital}" if kind else "", cache_dir=str(root / "cache"))
    out = root / f"{strategy}-{kind or 'clean'}-{'off' if norm == 0 else 'on'}"
    settings = {"strategy": strategy, "min_hospitals": plan.hospitals - bool(kind)}
    if norm is not None:
        settings["max_update_norm"] = norm
    config = dataclasses.replace(simulation_config(out, plan.hospitals, **settings), sim_dir=str(shared))
    start = time.perf_counter()
    report = run_simulation(config, plan)
    return {"strategy": strategy, "poison": f"{kind}:{hospital}" if kind else "none",
            "containment": "off" if norm == 0 else "on", "final_macro_auroc": report["final"]["macro_auroc"],
            "zero_shot": report["baselines"]["zero_shot"]["macro_auroc"],
            "centralized": report["baselines"]["centralized"]["macro_auroc"],
            "refused_replies": len([r for r in report["refused"] if r["outcome"] == "refused"]),
            "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospital", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated strategies (default: all runs)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/poisoning.json"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="poisoning-"))
    only = set(filter(None, args.only.split(",")))
    rows = []
    for strategy, kind, norm in RUNS:
        if only and strategy not in only:
            continue
        rows.append(run(strategy, kind, norm, args.hospital, root, root / "hospitals"))
        clean = {r["strategy"]: r["final_macro_auroc"] for r in rows if r["poison"] == "none"}
        for row in rows:
            row["loss_vs_clean"] = clean[row["strategy"]] - row["final_macro_auroc"] \
                if row["strategy"] in clean and row["final_macro_auroc"] is not None else None
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"runs": rows, "note": __doc__.split("Usage")[0].strip()}, indent=2))
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
