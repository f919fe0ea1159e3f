"""Benchmark: what DP-SGD costs. Not a test; writes bench/results/dp_cost.json.

1. Epoch time on cached embeddings with and without DP (same model, data and batch size), per embedding size.
   The prompt rows are random unit vectors shaped like CheXpert-5's (40 rows, 5 diseases): the cost does not
   depend on their values, so no backbone is loaded. The DP round's one-off accounting (noise search, budget
   check, ledger) is timed separately and left out of the epoch.
2. Final federated macro-AUROC of ``retune simulate`` defaults at each ε (default 1, 4, 8, ∞), per seed, with mean
   and spread and the loss against no DP paired by seed.

Usage: .venv/bin/python bench/dp_cost.py [--skip-simulate | --skip-epochs] [--dims 128 256] [--threads 1]
       [--epsilons inf 8 4 1] [--seeds 0 1 2] [--out bench/results/dp_cost.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from client.dp_trainer import train_adaptors_dp
from client.privacy import DPConfig, HospitalPrivacy, Spend
from client.trainer import Prompts, train_adaptors
from shared.config import SimulationPlan, TrainConfig
from shared.labels import CHEXPERT5
from shared.model import RetuneModel
from shared.prompts import PromptBank


class TimedPrivacy(HospitalPrivacy):
    """A hospital's privacy object that adds up the time spent in the accountant."""

    accounting_s = 0.0

    def epsilon(self, *extra: Spend) -> float:
        start = time.perf_counter()
        try:
            return super().epsilon(*extra)
        finally:
            self.accounting_s += time.perf_counter() - start


def epoch_times(dim: int, n: int = 20000, batch_size: int = 512, repeats: int = 3) -> dict:
    bank = PromptBank(CHEXPERT5)
    rows = torch.randn(len(bank.texts()), dim, generator=torch.Generator().manual_seed(0))
    rows = torch.nn.functional.normalize(rows, dim=-1)
    prompts = Prompts(rows, bank.averaging_matrix())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = (rng.random((n, len(CHEXPERT5))) < 0.3).astype(np.float32)
    config = TrainConfig(epochs=1, batch_size=batch_size)
    plain, dp, accounting = [], [], []
    for r in range(repeats):  # interleaved, so both see the same machine load
        torch.manual_seed(r)
        start = time.perf_counter()
        train_adaptors(RetuneModel(dim), x, y, prompts, config)
        plain.append(time.perf_counter() - start)
        privacy = TimedPrivacy(Path(tempfile.mkdtemp()) / "ledger.json", DPConfig(max_epsilon=8.0))
        start = time.perf_counter()
        train_adaptors_dp(RetuneModel(dim), x, y, prompts, config, privacy, 1, ("bench", 0, r))
        accounting.append(privacy.accounting_s)
        dp.append(time.perf_counter() - start - privacy.accounting_s)
    return {"samples": n, "embed_dim": dim, "batch_size": batch_size, "prompt_rows": len(rows),
            "plain_epoch_s": min(plain), "dp_epoch_s": min(dp), "dp_over_plain": min(dp) / min(plain),
            "dp_round_accounting_s": min(accounting), "all_plain_s": plain, "all_dp_s": dp}


def utility(epsilons: list[float | None], seeds: list[int], cache: Path) -> dict:
    """Final federated macro-AUROC of the simulate defaults at each ε, per seed (the seed draws the phantom data,
    the stage splits and the non-DP shuffling; DP noise is never seeded), with mean and spread, and the loss
    against no DP paired by seed."""
    from deploy.simulate import run_simulation, simulation_config

    runs: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        for eps in epsilons:
            out = Path(tempfile.mkdtemp(prefix=f"dp-{eps}-{seed}-"))
            plan = SimulationPlan(dp_epsilon=eps, cache_dir=str(cache))
            start = time.perf_counter()
            report = run_simulation(simulation_config(out, plan.hospitals, seed=seed), plan)
            runs.setdefault("inf" if eps is None else str(eps), {})[seed] = {
                "final_macro_auroc": report["final"]["macro_auroc"],
                "final_exact_macro_auroc": report["final"]["exact_macro_auroc"],
                "released_minus_exact": report["final"]["macro_auroc"] - report["final"]["exact_macro_auroc"],
                "round_deviation_max": report["monitoring"]["max_abs_deviation"],
                "privacy": report.get("privacy", {}),
                "zero_shot": report["baselines"]["zero_shot"]["macro_auroc"],
                "centralized": report["baselines"]["centralized"]["macro_auroc"],
                "wall_s": time.perf_counter() - start}
            print(f"ε={eps} seed={seed}: {report['final']['macro_auroc']:.4f}", flush=True)
    summary = {}
    for label, by_seed in runs.items():
        finals = np.array([by_seed[s]["final_macro_auroc"] for s in seeds])
        row = {"final_mean": float(finals.mean()), "final_std": float(finals.std(ddof=1)) if len(seeds) > 1 else 0.0,
               "runs": {str(s): by_seed[s] for s in seeds}}
        if "inf" in runs:
            loss = np.array([runs["inf"][s]["final_macro_auroc"] - by_seed[s]["final_macro_auroc"] for s in seeds])
            row.update({"loss_vs_no_dp_mean": float(loss.mean()),
                        "loss_vs_no_dp_std": float(loss.std(ddof=1)) if len(seeds) > 1 else 0.0})
        summary[label] = row
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results/dp_cost.json"))
    parser.add_argument("--skip-simulate", action="store_true", help="epoch timings only")
    parser.add_argument("--skip-epochs", action="store_true", help="utility at each ε only")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 256], help="embedding sizes to time")
    parser.add_argument("--epsilons", nargs="+", default=["inf", "8", "4", "1"], help="budgets ('inf': no DP)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="simulation seeds")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of the epoch timings (1: steadiest on a shared machine)")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # for the epoch timings only
    result = {"torch_threads": args.threads,
              "epoch_time": [] if args.skip_epochs else [epoch_times(dim) for dim in args.dims]}
    torch.set_num_threads(threads)
    print(json.dumps(result, indent=2))
    if not args.skip_simulate:
        epsilons = [None if e == "inf" else float(e) for e in args.epsilons]
        result["utility"] = utility(epsilons, args.seeds, Path(tempfile.mkdtemp(prefix="dp-cache-")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
