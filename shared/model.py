"""RE-tune adaptors and scoring: logit_d = s · (cos(img, pos_d) − cos(img, neg_d)), trained with masked BCE.

The backbone is frozen and lives elsewhere; with the ``retune`` adaptor kind this model sees cached embeddings only,
and its parameters are the image adaptor and the text adaptor, whatever the number of diseases. With ``lora`` or
``both`` (:func:`build_model`) it also holds LoRA-adapted copies of backbone towers (:mod:`shared.lora`), which take
preprocessed images or prompt tokens instead of cached embeddings; ``lora`` has no adaptors (identity maps). Either
way its ``state_dict`` is what trains and crosses the wire: adaptors and LoRA matrices, never frozen weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.config import ADAPTOR_KINDS, AdaptorConfig, FederationConfig, LoraConfig
from shared.errors import RetuneError


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


def _frozen(name: str) -> bool:
    """A backbone weight inside an adapted tower (not a LoRA matrix): never saved, sent or loaded."""
    return "_tower." in name and ".lora_" not in name


class RetuneModel(nn.Module):
    """Image and text adaptors over frozen embeddings of size ``dim``; optionally LoRA-adapted towers before them.

    ``adaptors=False`` replaces both adaptors by the identity (the ``lora`` kind). ``image_tower`` maps the image
    inputs (then preprocessed images) to embeddings, ``text_tower`` the prompt inputs (then token ids).
    """

    def __init__(self, dim: int, config: AdaptorConfig = AdaptorConfig(), *, adaptors: bool = True,
                 image_tower: nn.Module | None = None, text_tower: nn.Module | None = None,
                 lora: LoraConfig | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.config = config
        self.lora = lora
        self.image_adaptor: nn.Module = Adaptor(dim, config) if adaptors else nn.Identity()
        self.text_adaptor: nn.Module = Adaptor(dim, config) if adaptors else nn.Identity()
        self.image_tower = image_tower
        self.text_tower = text_tower

    @property
    def kind(self) -> str:
        """The adaptor kind: ``retune``, ``lora`` or ``both``."""
        if self.image_tower is None and self.text_tower is None:
            return "retune"
        return "both" if isinstance(self.image_adaptor, Adaptor) else "lora"

    def disease_embeddings(self, prompt_emb: torch.Tensor, averaging: torch.Tensor) -> torch.Tensor:
        """Adapt every prompt [T, d], average per disease and polarity with ``averaging`` [2C, T] -> [C, 2, d]."""
        mean = averaging @ self.text_adaptor(prompt_emb)
        return F.normalize(mean, dim=-1).view(-1, 2, self.dim)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, d] of the image inputs: cached embeddings as they are, or through the adapted tower."""
        return images if self.image_tower is None else self.image_tower(images)

    def prompt_embeddings(self, prompts: torch.Tensor) -> torch.Tensor:
        """Embeddings [T, d] of the prompt inputs: cached embeddings as they are, or through the adapted tower."""
        return prompts if self.text_tower is None else self.text_tower(prompts)

    def forward(self, images: torch.Tensor, prompts: torch.Tensor, averaging: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] for image inputs [B, ...] (cached embeddings [B, d] unless the image tower is adapted) and
        prompt inputs [T, ...] (cached embeddings [T, d] unless the text tower is adapted)."""
        return self.score(self.image_embeddings(images), self.prompt_embeddings(prompts), averaging)

    def score(self, image_emb: torch.Tensor, prompt_emb: torch.Tensor, averaging: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of image embeddings [B, d] against prompt embeddings [T, d], through the adaptors."""
        image = F.normalize(self.image_adaptor(image_emb), dim=-1)
        diseases = self.disease_embeddings(prompt_emb, averaging)
        return self.config.logit_scale * (image @ diseases[:, 0].T - image @ diseases[:, 1].T)

    def trainable(self) -> list[nn.Parameter]:
        """The parameters that train: adaptors and LoRA matrices."""
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> RetuneModel:
        """As :meth:`nn.Module.train`, but an adapted tower's frozen layers stay in eval mode (batch-norm
        statistics never move); only its LoRA layers (and their dropout) follow ``mode``."""
        super().train(mode)
        for tower in (self.image_tower, self.text_tower):
            if tower is not None:
                tower.eval()
                for name, module in tower.named_modules():
                    if ".lora_" in f".{name}":
                        module.train(mode)
        return self

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Adaptors and LoRA matrices only (an adapted tower's frozen weights are the backbone's)."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for name in [n for n in state if n.startswith(prefix) and _frozen(n[len(prefix):])]:
            del state[name]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load adaptors and LoRA matrices; with ``strict``, exactly those must be given. Frozen backbone weights
        are never loaded: a state holding any is refused whatever ``strict`` says."""
        frozen = [n for n in state_dict if _frozen(n)]
        if frozen:
            raise RuntimeError(f"Error(s) in loading state_dict for RetuneModel: frozen backbone weights "
                               f"{frozen[:3]} are not adaptors or LoRA matrices")
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [n for n in result.missing_keys if not _frozen(n)]
        unexpected = list(result.unexpected_keys)
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict for RetuneModel: missing keys {missing}, "
                               f"unexpected keys {unexpected}")
        return result

    @property
    def adapted_modules(self) -> dict[str, list[str]]:
        """The modules LoRA adapts in each adapted tower (empty for the ``retune`` kind)."""
        return {name: list(tower.adapted) for name, tower in (("image", self.image_tower), ("text", self.text_tower))
                if tower is not None}


def build_model(dim: int, adaptor: AdaptorConfig = AdaptorConfig(), kind: str = "retune",
                lora: LoraConfig | None = None, clip: nn.Module | None = None, seed: int = 0) -> RetuneModel:
    """The model of an adaptor kind: ``retune`` (adaptors on cached embeddings), ``lora`` (LoRA in the towers
    ``lora.towers`` of the frozen open_clip model ``clip``, no adaptors) or ``both``."""
    if kind == "retune":
        return RetuneModel(dim, adaptor)
    if kind not in ADAPTOR_KINDS:
        raise RetuneError(f"unknown adaptor kind {kind!r}: choose {', '.join(ADAPTOR_KINDS)}")
    if lora is None or clip is None:
        raise RetuneError(f"adaptor kind {kind!r} needs LoRA settings and the backbone's model")
    from shared.lora import adapted_tower

    towers = {t: adapted_tower(clip, t, lora, seed) for t in lora.towers}
    return RetuneModel(dim, adaptor, adaptors=kind == "both", image_tower=towers.get("image"),
                       text_tower=towers.get("text"), lora=lora)


def federation_model(config: FederationConfig, dim: int, backbone: str) -> RetuneModel:
    """The model a federation with ``config`` trains, initialised from ``config.seed`` (the server's round-1
    adaptors). LoRA's matrices take their shapes from the frozen towers, so for the ``lora`` and ``both`` kinds the
    open_clip model ``backbone`` is loaded (:func:`shared.backbone.cached_backbone`; its weights are never sent)."""
    from shared.backbone import cached_backbone

    clip = cached_backbone(backbone).model if config.adaptor_kind != "retune" else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_model(dim, AdaptorConfig(kind=config.adaptor), config.adaptor_kind, config.lora_config(), clip,
                           config.seed)


def zero_shot_logits(image_emb: torch.Tensor, prompt_emb: torch.Tensor, averaging: torch.Tensor) -> torch.Tensor:
    """The same score without adaptors: the frozen backbone's zero-shot baseline."""
    image = F.normalize(image_emb, dim=-1)
    diseases = F.normalize(averaging @ prompt_emb, dim=-1).view(-1, 2, prompt_emb.shape[-1])
    return image @ diseases[:, 0].T - image @ diseases[:, 1].T


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """BCE over labelled entries only; NaN labels (not labelled) are masked out. Labels may be soft (a distilled
    probability, :mod:`shared.continual`), and ``weights`` [B, C] weigh each entry (default 1).

    ``reduction="mean"`` averages over every labelled entry of the batch; ``"none"`` gives one loss per sample
    (the mean over that sample's labelled diseases, 0 where it has none), as per-sample DP clipping needs.
    """
    mask = ~torch.isnan(labels)
    loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(labels), reduction="none") * mask
    if weights is not None:
        loss = loss * weights
    if reduction == "none":
        return loss.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return loss.sum() / mask.sum().clamp(min=1)
