"""Centralized RE-tune: pooled training through a scenario, scored against the zero-shot baseline.

This is the reference a federation must match, and the ``centralized`` baseline of a simulation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from client.incremental import ScenarioResult, Split, run_scenario
from client.trainer import Prompts
from shared.config import AdaptorConfig, FederationConfig, LoraConfig, Scenario, TrainConfig
from shared.metrics import classification_metrics
from shared.model import RetuneModel, build_model, zero_shot_logits
from shared.scenarios import make_tasks


@dataclass
class CentralizedRun:
    """The trained model, its metrics (``metrics.json`` content) and the scenario trace."""

    model: RetuneModel
    metrics: dict
    scenario: ScenarioResult


def zero_shot_metrics(test: Split, prompts: Prompts, diseases: tuple[str, ...]) -> dict:
    """Metrics of the frozen backbone with the prompts and no adaptors."""
    logits = zero_shot_logits(torch.as_tensor(test.embeddings), prompts.embeddings, prompts.averaging).numpy()
    return classification_metrics(logits, test.labels, diseases)


def train_centralized(train: Split, test: Split, prompts: Prompts, diseases: tuple[str, ...], *,
                      scenario: Scenario = "joint", train_config: TrainConfig = TrainConfig(),
                      adaptor_config: AdaptorConfig = AdaptorConfig(), n_tasks: int | None = None,
                      device: torch.device | str = "cpu", on_task_done=None, kind: str = "retune",
                      lora: LoraConfig | None = None, clip: torch.nn.Module | None = None,
                      continual: str = "none", lwf_weight: float = FederationConfig.lwf_weight) -> CentralizedRun:
    """Train fresh adaptors (seeded by ``train_config.seed``) through ``scenario`` and score them on ``test``; with
    ``kind`` ``lora`` or ``both``, LoRA in the towers of the frozen open_clip model ``clip`` (see
    :func:`shared.model.build_model`); ``continual`` keeps earlier tasks' diseases (:mod:`shared.continual`)."""
    torch.manual_seed(train_config.seed)
    model = build_model(train.embeddings.shape[1], adaptor_config, kind, lora, clip, train_config.seed)
    tasks = make_tasks(scenario, train.labels, len(test.labels), diseases, n_tasks, train_config.seed)
    start = time.perf_counter()
    result = run_scenario(model, tasks, train=train, test=test, prompts=prompts, diseases=diseases,
                          config=train_config, device=device, on_task_done=on_task_done, continual=continual,
                          lwf_weight=lwf_weight)
    train_s = time.perf_counter() - start
    metrics = classification_metrics(result.final_logits, test.labels, diseases)
    zero = zero_shot_metrics(test, prompts, diseases)
    metrics["zero_shot"] = {key: zero[key] for key in ("macro_auroc", "per_class_auroc", "f1")}
    metrics["scenario"] = scenario
    metrics["adaptor_kind"] = kind
    metrics["continual"] = continual
    metrics["trainable_parameters"] = sum(p.numel() for p in model.trainable())
    metrics["train_s"] = train_s
    metrics["loss_per_epoch"] = result.losses
    if scenario != "joint":
        metrics.update(result.summary())
    return CentralizedRun(model, metrics, result)
