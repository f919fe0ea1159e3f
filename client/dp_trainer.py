"""DP-SGD of the adaptors: exact per-sample clipping of both adaptors; sampling, noise and accounting by opacus.

The text adaptor is trained on private labels too, so its parameters need per-sample clipping, yet all samples
share its output. Rather than giving every sample its own copy of the prompt rows (B × R rows through the text
adaptor), :meth:`client.dp_clip.PerSampleRetune.clipped_backward` runs it once per batch and clips every sample's
gradient over both adaptors exactly, in one backward pass (see :mod:`client.dp_clip`). It leaves in ``.grad``
what opacus' ghost clipping leaves there, the sum of the clipped per-sample gradients, so opacus' ``make_private``
(``grad_sample_mode="ghost"``, Poisson sampling) supplies the rest unchanged: the sampler, the DP optimizer
(Gaussian noise of σ·C, division by the expected batch size) and its accountant. Opacus' own per-sample hooks
(two backward passes per step) are not needed, so they are removed.
"""

from __future__ import annotations

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch.utils.data import DataLoader, TensorDataset

from client.dp_clip import PerSampleRetune
from client.privacy import DPConfig, HospitalPrivacy, spend
from client.trainer import Prompts
from shared.config import TrainConfig
from shared.model import RetuneModel


class Rows(TensorDataset):
    """A :class:`TensorDataset` that a DataLoader indexes once per batch rather than once per sample; the batch
    comes out as a list of tensors, which ``collate_fn=tuple`` passes on."""

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        return [t[indices] for t in self.tensors]


def make_private(module: PerSampleRetune, optimizer: torch.optim.Optimizer, loader: DataLoader, noise: float,
                 config: DPConfig) -> tuple[DPOptimizerFastGradientClipping, DataLoader]:
    """Opacus' DP optimizer and Poisson-sampling loader for ``module`` (ghost clipping's: it expects the summed
    clipped gradients in ``.grad``, which :meth:`PerSampleRetune.clipped_backward` computes)."""
    engine = PrivacyEngine(accountant=config.accountant)
    hooks, optimizer, _, loader = engine.make_private(
        module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=noise,
        max_grad_norm=config.max_grad_norm, grad_sample_mode="ghost", poisson_sampling=True, wrap_model=False)
    hooks.cleanup()  # per-sample norms and clipping are clipped_backward's
    return optimizer, loader


def train_adaptors_dp(model: RetuneModel, embeddings: np.ndarray, labels: np.ndarray, prompts: Prompts,
                      config: TrainConfig, privacy: HospitalPrivacy, rounds_left: int, where: tuple[str, int, int]
                      ) -> tuple[list[float], float]:
    """Train ``model`` in place with DP-SGD; returns (mean loss per epoch, ε spent so far after this round).

    Raises :class:`client.privacy.BudgetExhausted` before training when the round would exceed the budget.
    """
    keep = ~np.isnan(labels).all(axis=1)
    x = torch.as_tensor(embeddings[keep], dtype=torch.float32)
    y = torch.as_tensor(labels[keep], dtype=torch.float32)
    if len(x) == 0:
        return [], privacy.epsilon()
    sample_rate = min(1.0, config.batch_size / len(x))
    steps = config.epochs * max(1, round(1 / sample_rate))
    noise = privacy.noise_for(sample_rate, steps, rounds_left)
    entry = spend(noise, sample_rate, steps, *where)
    privacy.check(entry)
    torch.manual_seed(config.seed)
    module = PerSampleRetune(model, prompts).train()
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loader = DataLoader(Rows(x, y), batch_size=config.batch_size, collate_fn=tuple,
                        generator=torch.Generator().manual_seed(config.seed))
    optimizer, loader = make_private(module, optimizer, loader, noise, privacy.config)
    history = []
    for _ in range(config.epochs):
        total, seen = 0.0, 0
        for xb, yb in loader:
            if len(xb) == 0:
                continue
            losses, _ = module.clipped_backward(xb, yb, optimizer.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += float(losses.sum())
            seen += len(xb)
        history.append(total / max(seen, 1))
    model.eval()
    return history, privacy.commit(entry)
