"""Local training and scoring of the RE-tune adaptors on cached embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shared.config import TrainConfig
from shared.model import RetuneModel, masked_bce


@dataclass(frozen=True)
class Prompts:
    """Prompt embeddings [T, d] and the [2C, T] matrix that averages them per disease and polarity."""

    embeddings: torch.Tensor
    averaging: torch.Tensor


def train_adaptors(model: RetuneModel, embeddings: np.ndarray, labels: np.ndarray, prompts: Prompts,
                   config: TrainConfig, device: torch.device | str = "cpu", proximal_mu: float = 0.0) -> list[float]:
    """Train ``model`` in place with Adam on masked BCE; returns the mean loss of each epoch.

    Rows without a single labelled disease carry no signal and are dropped. ``proximal_mu`` > 0 adds FedProx's
    ``mu/2 · ||w − w_start||²`` towards the weights the model started from (the received global adaptors).
    """
    keep = ~np.isnan(labels).all(axis=1)
    x = torch.as_tensor(embeddings[keep], dtype=torch.float32, device=device)
    y = torch.as_tensor(labels[keep], dtype=torch.float32, device=device)
    text, averaging = prompts.embeddings.to(device), prompts.averaging.to(device)
    model.to(device).train()
    if len(x) == 0:
        return []
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history = []
    for _ in range(config.epochs):
        total = 0.0
        for rows in torch.randperm(len(x), generator=generator).split(config.batch_size):
            rows = rows.to(device)
            loss = masked_bce(model(x[rows], text, averaging), y[rows])
            objective = loss + proximal_mu / 2 * sum((p - a).square().sum() for p, a in zip(model.parameters(), anchor))
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            total += float(loss.detach()) * len(rows)
        history.append(total / len(x))
    model.eval()
    return history


@torch.inference_mode()
def predict_logits(model: RetuneModel, embeddings: np.ndarray, prompts: Prompts,
                   device: torch.device | str = "cpu", batch_size: int = 8192) -> np.ndarray:
    """Logits [N, C] of cached image embeddings."""
    model.to(device).eval()
    text, averaging = prompts.embeddings.to(device), prompts.averaging.to(device)
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    out = [model(chunk.to(device), text, averaging).cpu() for chunk in x.split(batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, averaging.shape[0] // 2), dtype=np.float32)
