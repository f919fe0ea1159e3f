"""RE-tune adaptors and scoring: logit_d = s · (cos(img, pos_d) − cos(img, neg_d)), trained with masked BCE.

The backbone is frozen and lives elsewhere; this model sees cached embeddings only. Its parameters are the image
adaptor and the text adaptor, whatever the number of diseases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.config import AdaptorConfig


class Adaptor(nn.Module):
    """One modality's adaptor: ``mlp``, ``linear`` or ``residual`` (see :class:`AdaptorConfig`)."""

    def __init__(self, dim: int, config: AdaptorConfig) -> None:
        super().__init__()
        self.kind = config.kind
        self.alpha = config.residual_alpha
        if config.kind == "linear":
            self.net: nn.Module = nn.Linear(dim, dim)
        elif config.kind in ("mlp", "residual"):
            hidden = config.hidden_mult * dim
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        else:
            raise ValueError(f"unknown adaptor kind {config.kind!r}")
        if config.init == "identity":
            if config.kind != "linear" and config.hidden_mult < 2:
                raise ValueError("identity init of an MLP adaptor needs hidden_mult >= 2 (relu(x) - relu(-x))")
            self._identity()

    @torch.no_grad()
    def _identity(self) -> None:
        """Start as the identity map, i.e. from the frozen backbone's zero-shot scores.

        A ReLU MLP with hidden width >= 2d is the identity as relu(x) − relu(−x); a residual mix of it stays one.
        """
        layers = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        for layer in layers:
            layer.bias.zero_()
        if len(layers) == 1:
            layers[0].weight.copy_(torch.eye(layers[0].in_features))
            return
        first, last = layers
        eye = torch.eye(first.in_features)
        first.weight.zero_()
        last.weight.zero_()
        first.weight[: 2 * len(eye)] = torch.cat([eye, -eye])
        last.weight[:, : 2 * len(eye)] = torch.cat([eye, -eye], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return self.alpha * out + (1.0 - self.alpha) * x if self.kind == "residual" else out


class RetuneModel(nn.Module):
    """Image and text adaptors over frozen embeddings of size ``dim``."""

    def __init__(self, dim: int, config: AdaptorConfig = AdaptorConfig()) -> None:
        super().__init__()
        self.dim = dim
        self.config = config
        self.image_adaptor = Adaptor(dim, config)
        self.text_adaptor = Adaptor(dim, config)

    def disease_embeddings(self, prompt_emb: torch.Tensor, averaging: torch.Tensor) -> torch.Tensor:
        """Adapt every prompt [T, d], average per disease and polarity with ``averaging`` [2C, T] -> [C, 2, d]."""
        mean = averaging @ self.text_adaptor(prompt_emb)
        return F.normalize(mean, dim=-1).view(-1, 2, self.dim)

    def forward(self, image_emb: torch.Tensor, prompt_emb: torch.Tensor, averaging: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] for cached image embeddings [B, d] and prompt embeddings [T, d]."""
        image = F.normalize(self.image_adaptor(image_emb), dim=-1)
        diseases = self.disease_embeddings(prompt_emb, averaging)
        return self.config.logit_scale * (image @ diseases[:, 0].T - image @ diseases[:, 1].T)


def zero_shot_logits(image_emb: torch.Tensor, prompt_emb: torch.Tensor, averaging: torch.Tensor) -> torch.Tensor:
    """The same score without adaptors: the frozen backbone's zero-shot baseline."""
    image = F.normalize(image_emb, dim=-1)
    diseases = F.normalize(averaging @ prompt_emb, dim=-1).view(-1, 2, prompt_emb.shape[-1])
    return image @ diseases[:, 0].T - image @ diseases[:, 1].T


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """BCE over labelled entries only; NaN labels (not labelled) are masked out.

    ``reduction="mean"`` averages over every labelled entry of the batch; ``"none"`` gives one loss per sample
    (the mean over that sample's labelled diseases, 0 where it has none), as per-sample DP clipping needs.
    """
    mask = ~torch.isnan(labels)
    loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(labels), reduction="none") * mask
    if reduction == "none":
        return loss.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return loss.sum() / mask.sum().clamp(min=1)
