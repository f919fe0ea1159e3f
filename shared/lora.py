"""LoRA inside the frozen backbone (PeFoMed's adaptation), with peft: which modules it adapts, and the adapted towers.

A tower adapted with LoRA is a copy of the backbone's image or text encoder whose target modules peft wraps with
a low-rank update (alpha / r)·B·A; only A and B train (B starts at zero, so an adapted tower starts as the frozen
one). Its embeddings change as it learns, so it cannot use the embedding cache: it runs on preprocessed images or
tokenised prompts every step. The frozen weights never leave the hospital and never enter a checkpoint or a
message: :class:`shared.model.RetuneModel`'s ``state_dict`` holds the LoRA matrices and adaptors only.

open_clip's attention pool (the ResNet towers') reads its projection weights directly instead of calling them, so
LoRA (and opacus' per-sample hooks) would never see them: :func:`adapted_tower` gives each pool of the copy a
forward that calls its projections as modules, batch first, with the same result.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F
from torch import nn

from shared.config import LoraConfig
from shared.errors import RetuneError

#: What LoRA may adapt: the attention's query, key and value projections, by these names or, in a tower without
#: them, by the tower's own (BERT's ``query``/``key``/``value``, a timm ViT's fused ``qkv``; open_clip's ViT has a
#: ``MultiheadAttention``, adapted whole: q, k, v and its output projection). Nothing else (a stem convolution that
#: sees raw pixel patches, an embedding, an MLP) is ever adapted, whatever a run config asks.
EQUIVALENTS: dict[str, tuple[str, ...]] = {"q_proj": ("query", "qkv"), "k_proj": ("key", "qkv"),
                                           "v_proj": ("value", "qkv")}


def resolve_targets(tower: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Full names of the modules of ``tower`` that LoRA adapts for ``targets`` (attention projections only).

    A target matches Linear modules whose name ends with it; where none does, the tower's equivalent
    (:data:`EQUIVALENTS`) or its ``MultiheadAttention`` modules. A target that is not an attention projection, or
    matches nothing, is an error.
    """
    allowed = set(EQUIVALENTS) | {alias for aliases in EQUIVALENTS.values() for alias in aliases}
    modules = dict(tower.named_modules())
    linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    chosen: list[str] = []
    for target in targets:
        if target not in allowed:
            raise RetuneError(f"LoRA target {target!r}: LoRA adapts the attention's projections only "
                              f"({', '.join(sorted(allowed))})")
        found = [n for n in linear if n.endswith(f".{target}")]
        for alias in EQUIVALENTS.get(target, ()):
            found = found or [n for n in linear if n.endswith(f".{alias}")]
        if not found and target in EQUIVALENTS:
            found = [n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)]
        if not found:
            raise RetuneError(f"LoRA target {target!r} matches no attention projection of the {type(tower).__name__} "
                              "tower (set --lora-targets)")
        chosen.extend(n for n in found if n not in chosen)
    return chosen


def _pool_forward(self, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ``AttentionPool2d`` with its projections called as modules, batch first. It returns the
    attention output of the mean token only, so only that token's query is computed."""
    x = x.flatten(2).transpose(1, 2)  # N C H W -> N (HW) C
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
    n, length, width = x.shape
    heads = self.num_heads
    q = self.q_proj(x[:, :1]).view(n, 1, heads, -1).transpose(1, 2)
    k = self.k_proj(x).view(n, length, heads, -1).transpose(1, 2)
    v = self.v_proj(x).view(n, length, heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, width)
    return self.c_proj(out)


def _call_pool_projections(tower: nn.Module) -> None:
    from open_clip.modified_resnet import AttentionPool2d

    for module in tower.modules():
        if isinstance(module, AttentionPool2d):
            module.forward = types.MethodType(_pool_forward, module)


class ImageTower(nn.Module):
    """The backbone's image encoder, adapted: preprocessed images [B, 3, H, W] → L2-normalised embeddings [B, d].
    ``adapted`` names the modules LoRA adapts."""

    def __init__(self, visual: nn.Module, adapted: tuple[str, ...]) -> None:
        super().__init__()
        self.visual = visual
        self.adapted = adapted

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(pixels.float()).float(), dim=-1)


class TextTower(nn.Module):
    """The backbone's text encoder, adapted: token ids [T, L] → L2-normalised embeddings [T, d]. ``adapted`` names
    the modules LoRA adapts."""

    def __init__(self, clip: nn.Module, adapted: tuple[str, ...]) -> None:
        super().__init__()
        self.clip = clip
        self.adapted = adapted

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)


def _text_part(clip: nn.Module) -> nn.Module:
    """A copy of an open_clip model without its image tower (``encode_text`` never uses it)."""
    shell = copy.copy(clip)
    shell._modules = {name: m for name, m in clip._modules.items() if name != "visual"}
    return copy.deepcopy(shell)


def adapted_tower(clip: nn.Module, tower: str, config: LoraConfig, seed: int = 0) -> ImageTower | TextTower:
    """A copy of ``clip``'s ``tower`` ("image" or "text"), on the CPU, with peft LoRA on ``config.targets``; only
    the LoRA matrices train. Their initialisation is seeded (A as peft draws it, B zero)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    part = (copy.deepcopy(clip.visual) if tower == "image" else _text_part(clip)).cpu()
    if tower == "image":
        _call_pool_projections(part)
    part.requires_grad_(False)
    names = resolve_targets(part, config.targets)
    peft_config = PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                 target_modules=names, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(peft_config, part)
    part.eval()
    return ImageTower(part, tuple(names)) if tower == "image" else TextTower(part, tuple(names))

