"""Benchmark: what DP-SGD costs. Not a test; writes bench/results/dp_cost.json.

1. Epoch time on cached embeddings with and without DP (same model, data and batch size).
2. Final federated macro-AUROC of ``retune simulate`` defaults at ε ∈ {1, 4, 8, ∞}.

Usage: .venv/bin/python bench/dp_cost.py [--skip-simulate] [--out bench/results/dp_cost.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from client.dp_trainer import train_adaptors_dp
from client.privacy import DPConfig, HospitalPrivacy
from client.trainer import Prompts, train_adaptors
from shared.backbone import load_backbone
from shared.config import OFFLINE_DEFAULT, SimulationPlan, TrainConfig
from shared.labels import CHEXPERT5
from shared.model import RetuneModel
from shared.prompts import PromptBank


def epoch_times(n: int = 20000, repeats: int = 3) -> dict:
    backbone = load_backbone(OFFLINE_DEFAULT, device="cpu")
    bank = PromptBank(CHEXPERT5)
    prompts = Prompts(backbone.encode_texts(bank.texts()), bank.averaging_matrix())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, backbone.embed_dim)).astype(np.float32)
    y = (rng.random((n, len(CHEXPERT5))) < 0.3).astype(np.float32)
    config = TrainConfig(epochs=1, batch_size=512)
    plain, dp = [], []
    for r in range(repeats):  # interleaved, so both see the same machine load
        torch.manual_seed(r)
        start = time.perf_counter()
        train_adaptors(RetuneModel(backbone.embed_dim), x, y, prompts, config)
        plain.append(time.perf_counter() - start)
        privacy = HospitalPrivacy(Path(tempfile.mkdtemp()) / "ledger.json", DPConfig(max_epsilon=8.0))
        start = time.perf_counter()
        train_adaptors_dp(RetuneModel(backbone.embed_dim), x, y, prompts, config, privacy, 1, ("bench", 0, r))
        dp.append(time.perf_counter() - start)
    return {"samples": n, "embed_dim": backbone.embed_dim, "batch_size": 512, "backbone": backbone.spec,
            "plain_epoch_s": min(plain), "dp_epoch_s": min(dp), "dp_over_plain": min(dp) / min(plain),
            "all_plain_s": plain, "all_dp_s": dp}


def utility(epsilons: list[float | None], cache: Path) -> dict:
    from deploy.simulate import run_simulation, simulation_config

    results = {}
    for eps in epsilons:
        out = Path(tempfile.mkdtemp(prefix=f"dp-{eps}-"))
        plan = SimulationPlan(dp_epsilon=eps)
        config = replace(simulation_config(out, plan.hospitals), cache=str(cache))
        start = time.perf_counter()
        report = run_simulation(config, plan)
        results["inf" if eps is None else str(eps)] = {
            "final_macro_auroc": report["final"]["macro_auroc"], "privacy": report.get("privacy", {}),
            "zero_shot": report["baselines"]["zero_shot"]["macro_auroc"],
            "centralized": report["baselines"]["centralized"]["macro_auroc"], "wall_s": time.perf_counter() - start}
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results/dp_cost.json"))
    parser.add_argument("--skip-simulate", action="store_true")
    args = parser.parse_args()
    result = {"epoch_time": epoch_times()}
    print(json.dumps(result, indent=2))
    if not args.skip_simulate:
        result["utility"] = utility([None, 8.0, 4.0, 1.0], Path(tempfile.mkdtemp(prefix="dp-cache-")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
