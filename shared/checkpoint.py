"""Adaptor checkpoints: ``adaptors.safetensors`` plus a JSON sidecar saying what they belong to."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from shared import __version__
from shared.config import AdaptorConfig, LoraConfig
from shared.errors import RetuneError
from shared.model import RetuneModel, build_model
from shared.prompts import PromptBank

WEIGHTS = "adaptors.safetensors"
SIDECAR = "adaptors.json"
FORMAT_VERSION = 1


def save_checkpoint(folder: Path, model: RetuneModel, prompts: PromptBank, backbone: dict[str, Any],
                    run: dict[str, Any] | None = None) -> Path:
    """Write the adaptors and their sidecar (backbone, embedding size, diseases, prompts, versions, and for a
    federation the run it ends)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS)
    sidecar = {
        "format_version": FORMAT_VERSION,
        "retune_version": __version__,
        "backbone": backbone,
        "embed_dim": model.dim,
        "diseases": list(prompts.diseases),
        "prompts": prompts.to_dict(),
        "adaptor": asdict(model.config),
        "adaptor_kind": model.kind,
        **({"lora": asdict(model.lora), "lora_modules": model.adapted_modules} if model.lora is not None else {}),
        **({"run": run} if run is not None else {}),
    }
    (folder / SIDECAR).write_text(json.dumps(sidecar, indent=2))
    return folder


def read_sidecar(folder: Path) -> dict[str, Any]:
    """A checkpoint's sidecar (what its weights belong to), checked to be a checkpoint of this format."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / SIDECAR).is_file():
        raise RetuneError(f"{folder} is not a checkpoint: expected {WEIGHTS} and {SIDECAR} in it")
    sidecar = json.loads((folder / SIDECAR).read_text())
    if sidecar.get("format_version") != FORMAT_VERSION:
        raise RetuneError(f"{folder}: checkpoint format {sidecar.get('format_version')} is not {FORMAT_VERSION}")
    return sidecar


def load_checkpoint(folder: Path, clip: nn.Module | None = None) -> tuple[RetuneModel, PromptBank, dict[str, Any]]:
    """Read a checkpoint folder back: model (eval mode), prompt bank and the sidecar. A checkpoint with LoRA needs
    the frozen open_clip model ``clip`` it adapts (loaded from the sidecar's backbone when not given)."""
    folder = Path(folder)
    sidecar = read_sidecar(folder)
    kind = sidecar.get("adaptor_kind", "retune")
    if kind != "retune" and clip is None:
        from shared.backbone import cached_backbone

        clip = cached_backbone(sidecar["backbone"]["spec"]).model
    lora = LoraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in sidecar["lora"].items()}) \
        if "lora" in sidecar else None
    with torch.random.fork_rng(devices=[]):
        model = build_model(int(sidecar["embed_dim"]), AdaptorConfig(**sidecar["adaptor"]), kind, lora, clip)
    try:
        model.load_state_dict(load_file(folder / WEIGHTS))
    except RuntimeError as exc:
        raise RetuneError(f"{folder}: adaptor weights do not match the sidecar: {exc}") from exc
    return model.eval(), PromptBank.from_dict(sidecar["prompts"]), sidecar
