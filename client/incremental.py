"""Run an incremental scenario centrally: train task after task, score every task after each one."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from client.trainer import Prompts, predict_logits, stage_targets, train_adaptors
from shared.config import FederationConfig, TrainConfig
from shared.continual import stage_examples
from shared.errors import RetuneError
from shared.metrics import forgetting, macro, per_class_auroc
from shared.model import RetuneModel
from shared.scenarios import Task


@dataclass
class Split:
    """Cached embeddings [N, d] and labels [N, C] (NaN = not labelled) of one data split, and its preprocessed
    images [N, 3, H, W] where LoRA adapts the image tower (whose embeddings cannot be cached)."""

    embeddings: np.ndarray
    labels: np.ndarray
    pixels: np.ndarray | None = None

    def inputs(self, model: RetuneModel) -> np.ndarray:
        """What ``model`` takes for these images: cached embeddings, or preprocessed images for an adapted tower."""
        if model.image_tower is None:
            return self.embeddings
        if self.pixels is None:
            raise RetuneError("LoRA adapts the image tower, but these images were loaded as cached embeddings only")
        return self.pixels


@dataclass
class ScenarioResult:
    """Task matrix (AUROC on task j's test data after task i), its forgetting, per-task loss curves and the final
    model's test logits."""

    tasks: list[str]
    task_matrix: list[list[float | None]] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)
    final_logits: np.ndarray | None = None

    def summary(self) -> dict:
        return {"tasks": self.tasks, "task_matrix": self.task_matrix, **forgetting(self.task_matrix)}


def task_auroc(logits: np.ndarray, test: Split, task: Task, diseases: tuple[str, ...]) -> float | None:
    """Macro AUROC over the task's scored diseases on the task's test rows."""
    aurocs = per_class_auroc(logits[task.test_rows], test.labels[task.test_rows], diseases)
    return macro({d: aurocs[d] for d in task.scored})


def run_scenario(model: RetuneModel, tasks: list[Task], *, train: Split, test: Split, prompts: Prompts,
                 diseases: tuple[str, ...], config: TrainConfig, device: torch.device | str = "cpu",
                 on_task_done=None, continual: str = "none", lwf_weight: float = FederationConfig.lwf_weight) -> ScenarioResult:
    """Train ``model`` through ``tasks`` in order, keeping earlier tasks' diseases by the ``continual`` method
    (:mod:`shared.continual`; only ``replay`` trains on earlier tasks' data again)."""
    result = ScenarioResult(tasks=[t.name for t in tasks])
    for i, task in enumerate(tasks):
        rows, labels = stage_examples(tasks, i, train.labels, diseases, continual)
        inputs = train.inputs(model)[rows]
        targets = stage_targets(model, inputs, labels, prompts, diseases, tasks, i, continual, lwf_weight)
        result.losses.append(train_adaptors(model, inputs, targets.labels, prompts, config, device,
                                            weights=targets.weights))
        logits = predict_logits(model, test.inputs(model), prompts, device)
        result.task_matrix.append([task_auroc(logits, test, t, diseases) for t in tasks])
        result.final_logits = logits
        if on_task_done is not None:
            on_task_done(i, task)
    return result
