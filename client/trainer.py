"""Local training and scoring of the RE-tune adaptors on cached embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shared.config import TrainConfig
from shared.continual import DISTILLING, Targets, lwf_targets, old_diseases
from shared.errors import RetuneError
from shared.model import RetuneModel, masked_bce
from shared.scenarios import Task


@dataclass(frozen=True)
class Prompts:
    """Prompt embeddings [T, d] and the [2C, T] matrix that averages them per disease and polarity; the prompts'
    token ids [T, L] where LoRA adapts the text tower (whose embeddings cannot be cached)."""

    embeddings: torch.Tensor
    averaging: torch.Tensor
    tokens: torch.Tensor | None = None

    def inputs(self, model: RetuneModel) -> torch.Tensor:
        """What ``model`` takes for the prompts: cached embeddings, or token ids for an adapted text tower."""
        if model.text_tower is None:
            return self.embeddings
        if self.tokens is None:
            raise RetuneError("LoRA adapts the text tower, but the prompts were loaded as cached embeddings only")
        return self.tokens


def train_adaptors(model: RetuneModel, embeddings: np.ndarray, labels: np.ndarray, prompts: Prompts,
                   config: TrainConfig, device: torch.device | str = "cpu", proximal_mu: float = 0.0,
                   weights: np.ndarray | None = None) -> list[float]:
    """Train ``model`` in place with Adam on masked BCE; returns the mean loss of each epoch.

    Rows without a single labelled disease carry no signal and are dropped. ``proximal_mu`` > 0 adds FedProx's
    ``mu/2 · ||w − w_start||²`` towards the weights the model started from (the received global adaptors).
    ``weights`` [N, C] weigh each label entry (distilled ones, :mod:`shared.continual`; default 1).
    """
    keep = ~np.isnan(labels).all(axis=1)
    x = torch.as_tensor(embeddings[keep])  # preprocessed images stay float16 (and here) until their batch
    y = torch.as_tensor(labels[keep], dtype=torch.float32, device=device)
    w = None if weights is None else torch.as_tensor(weights[keep], dtype=torch.float32, device=device)
    text, averaging = prompts.inputs(model).to(device), prompts.averaging.to(device)
    model.to(device).train()
    if len(x) == 0:
        return []
    params = model.trainable()
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    history = []
    for _ in range(config.epochs):
        total = 0.0
        for rows in torch.randperm(len(x), generator=generator).split(config.batch_size):
            at = rows.to(device)
            loss = masked_bce(model(x[rows].to(device, torch.float32), text, averaging), y[at],
                              weights=None if w is None else w[at])
            objective = loss + proximal_mu / 2 * sum((p - a).square().sum() for p, a in zip(params, anchor))
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            total += float(loss.detach()) * len(rows)
        history.append(total / len(x))
    model.eval()
    return history


@torch.inference_mode()
def embed_images(model: RetuneModel, images: np.ndarray, device: torch.device | str = "cpu",
                 batch_size: int = 8192) -> torch.Tensor:
    """Embeddings [N, d] of image inputs (:meth:`RetuneModel.image_embeddings`) in batches, each made float32 only
    when its turn comes (preprocessed images stay float16 until then); on ``device``."""
    model.to(device).eval()
    if model.image_tower is not None:
        batch_size = min(batch_size, 256)  # images through the tower, not cached vectors
    chunks = torch.as_tensor(images).split(batch_size)
    if not chunks:
        return torch.zeros(0, model.dim, device=device)
    return torch.cat([model.image_embeddings(chunk.to(device, torch.float32)) for chunk in chunks])


@torch.inference_mode()
def predict_logits(model: RetuneModel, embeddings: np.ndarray, prompts: Prompts,
                   device: torch.device | str = "cpu", batch_size: int = 8192) -> np.ndarray:
    """Logits [N, C] of cached image embeddings (or preprocessed images, when LoRA adapts the image tower)."""
    averaging = prompts.averaging.to(device)
    text = model.to(device).eval().prompt_embeddings(prompts.inputs(model).to(device))
    return model.score(embed_images(model, embeddings, device, batch_size), text, averaging).cpu().numpy()


def stage_targets(model: RetuneModel, inputs: np.ndarray, labels: np.ndarray, prompts: Prompts,
                  diseases: tuple[str, ...], tasks: list[Task], stage: int, method: str, weight: float) -> Targets:
    """A stage's training targets under the continual ``method`` (:mod:`shared.continual`): for ``lwf`` and ``replay``,
    ``model`` as it is now (before the stage's training) scores the old diseases on ``inputs``."""
    old = old_diseases(tasks, stage) if method in DISTILLING else ()
    if not old:
        return Targets(labels)
    return lwf_targets(labels, predict_logits(model, inputs, prompts), diseases, old, weight)
