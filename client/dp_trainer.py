"""DP-SGD training of the adaptors with opacus: per-sample clipping and Gaussian noise on both adaptors.

The text adaptor is trained on private labels too, so it needs per-sample gradients. Each sample therefore
carries its own view of the prompt rows (``expand``, no copy), which lets opacus see a batch dimension in every
layer; ghost clipping computes the per-sample norms without materialising per-sample gradients.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.privacy import HospitalPrivacy, spend
from client.trainer import Prompts
from shared.config import TrainConfig
from shared.model import RetuneModel, masked_bce


class PerSampleRetune(nn.Module):
    """The same adaptors and score as :class:`RetuneModel`, with the prompt rows expanded per sample."""

    def __init__(self, model: RetuneModel, prompts: Prompts) -> None:
        super().__init__()
        self.image_adaptor, self.text_adaptor = model.image_adaptor, model.text_adaptor
        self.scale = model.config.logit_scale
        self.register_buffer("rows", prompts.embeddings.float())
        self.register_buffer("averaging", prompts.averaging.float())

    def forward(self, image_emb: torch.Tensor) -> torch.Tensor:
        batch = image_emb.shape[0]
        image = F.normalize(self.image_adaptor(image_emb), dim=-1)
        text = self.text_adaptor(self.rows.unsqueeze(0).expand(batch, -1, -1))
        diseases = F.normalize(torch.einsum("kt,btd->bkd", self.averaging, text), dim=-1)
        diseases = diseases.view(batch, -1, 2, diseases.shape[-1])
        return self.scale * torch.einsum("bd,bcpd->bcp", image, diseases) @ torch.tensor([1.0, -1.0])


class MaskedBCE(nn.Module):
    """Masked BCE whose ``reduction`` opacus may switch to ``"none"`` (one loss per sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return masked_bce(logits, labels, self.reduction)


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
    loader = DataLoader(TensorDataset(x, y), batch_size=config.batch_size,
                        generator=torch.Generator().manual_seed(config.seed))
    engine = PrivacyEngine(accountant=privacy.config.accountant)
    private, optimizer, criterion, loader = engine.make_private(
        module=module, optimizer=optimizer, data_loader=loader, criterion=MaskedBCE(), noise_multiplier=noise,
        max_grad_norm=privacy.config.max_grad_norm, grad_sample_mode="ghost", poisson_sampling=True)
    history = []
    try:
        for _ in range(config.epochs):
            total, seen = 0.0, 0
            for xb, yb in loader:
                if len(xb) == 0:
                    continue
                loss = criterion(private(xb), yb)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                total += float(loss.detach()) * len(xb)
                seen += len(xb)
            history.append(total / max(seen, 1))
    finally:
        private._close()  # remove opacus hooks from the shared adaptor modules
    model.eval()
    return history, privacy.commit(entry)
