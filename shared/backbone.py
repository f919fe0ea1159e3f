"""The frozen vision-language backbone, chosen by one spec string and built by open_clip's factory.

A spec is one of:

- ``biomedclip`` — alias of ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` (production);
- any ``hf-hub:org/repo`` id;
- a local directory (or ``local-dir:DIR``) holding ``open_clip_config.json`` + weights — how an air-gapped
  hospital stages BiomedCLIP;
- a built-in open_clip architecture name, optionally ``NAME:PRETRAINED_TAG``; without a tag the weights are
  randomly initialised (seeded, so the result is reproducible) and every output says so;
- a backbone shipped with retune-fl (``retune-minilm-phantom``) or a folder written by ``retune build-backbone``:
  verified against its ``SHA256SUMS``, assembled once into a complete open_clip directory under the cache
  (:mod:`shared.artifact`) and loaded through ``local-dir:`` like any staged directory.

A staged directory whose HF text tower names its model by a relative ``hf_model_name`` (``org/name``) that exists
as a folder inside the directory (holding that model's ``config.json``) uses that folder, so the text tower's
configuration resolves offline (e.g. stage BiomedCLIP with ``microsoft/BiomedNLP-.../config.json`` beside it).

The backbone is frozen: no gradients, eval mode. Its embedding size is read from the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from PIL import Image

from shared.config import OFFLINE_DEFAULT
from shared.errors import RetuneError

BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
ALIASES: dict[str, str] = {"biomedclip": BIOMEDCLIP}
#: Embedding sizes of hub models whose configuration cannot be read offline.
KNOWN_EMBED_DIMS: dict[str, int] = {BIOMEDCLIP: 512}
_CONFIG_DIR = Path(__file__).parent / "assets" / "model_configs"
_RANDOM_INIT_SEED = 0

open_clip.add_model_config(_CONFIG_DIR)
log = logging.getLogger(__name__)


def default_device() -> torch.device:
    """CUDA when the hospital has a GPU, the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Backbone:
    """A frozen open_clip model with its preprocessing and tokenizer."""

    spec: str
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    embed_dim: int
    pretrained: bool
    identity: str
    device: torch.device

    @property
    def label(self) -> str:
        """Human-readable name; a randomly initialised backbone is labelled as such everywhere it is shown."""
        return self.spec if self.pretrained else f"{self.spec} (RANDOMLY INITIALISED, not pretrained: demo only)"

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "label": self.label, "pretrained": self.pretrained,
                "embed_dim": self.embed_dim, "identity": self.identity}

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised float32 text embeddings [len(texts), embed_dim] on the CPU."""
        tokens = self.tokenizer(texts).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()


def resolve_spec(spec: str) -> tuple[str, str]:
    """Map a user spec to (open_clip model name, pretrained tag or '').

    A shipped or built backbone artifact is verified and staged here (once), and maps to its staged directory.
    """
    from shared.artifact import resolve_artifact, stage

    spec = ALIASES.get(spec.lower(), spec)
    artifact = resolve_artifact(spec)
    if artifact is not None:
        return f"local-dir:{stage(artifact)}", ""
    if spec.startswith(("hf-hub:", "local-dir:")):
        return spec, ""
    if Path(spec).expanduser().is_dir():
        return f"local-dir:{Path(spec).expanduser().resolve()}", ""
    name, _, tag = spec.partition(":")
    if name not in open_clip.list_models():
        raise RetuneError(
            f"unknown backbone {spec!r}: give 'biomedclip', an 'hf-hub:org/repo' id, a directory holding "
            f"open_clip_config.json and weights, or an open_clip model name such as {OFFLINE_DEFAULT!r}")
    return name, tag


def config_embed_dim(spec: str) -> int:
    """The embedding size a spec's configuration declares, without loading (or staging) any weights: what the
    aggregation server needs, which never holds the backbone."""
    from shared.artifact import CONFIG_FILE, read_config, resolve_artifact

    spec = ALIASES.get(spec.lower(), spec)
    if spec in KNOWN_EMBED_DIMS:
        return KNOWN_EMBED_DIMS[spec]
    artifact = resolve_artifact(spec)
    folder = artifact or (Path(spec[len("local-dir:"):]) if spec.startswith("local-dir:") else Path(spec).expanduser())
    try:
        if folder.is_dir():
            return int(read_config(folder)["model_cfg"]["embed_dim"])
        config = open_clip.get_model_config(spec.partition(":")[0])
        if config is not None:
            return int(config["embed_dim"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RetuneError(f"cannot read the embedding size of backbone {spec!r} from {folder / CONFIG_FILE}: "
                          f"{exc}; set run config embed-dim") from None
    raise RetuneError(f"the embedding size of backbone {spec!r} is not known without its weights: set run config "
                      "embed-dim (e.g. 512 for BiomedCLIP)")


def _state_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _staged_text_tower(name: str) -> dict[str, Any]:
    """open_clip overrides pointing a staged directory's HF text tower at the model folder staged inside it.

    Only for ``local-dir:`` specs whose ``text_cfg.hf_model_name`` is a relative path naming a folder of the
    directory with a ``config.json``; every other spec gets no override (open_clip's own behaviour).
    """
    if not name.startswith("local-dir:"):
        return {}
    root = Path(name[len("local-dir:"):])
    try:
        text_cfg = dict(json.loads((root / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # open_clip reports a missing or broken config itself
    hf_name = text_cfg.get("hf_model_name")
    if not hf_name or Path(hf_name).is_absolute() or not (root / hf_name / "config.json").is_file():
        return {}
    text_cfg["hf_model_name"] = str((root / hf_name).resolve())
    # As open_clip does: the HF tower loads its own pretrained weights only when no full checkpoint is staged.
    has_checkpoint = any(any(root.glob(f"*{ext}")) for ext in (".safetensors", ".bin", ".pth"))
    text_cfg["hf_model_pretrained"] = not has_checkpoint
    return {"text_cfg": text_cfg}


def _identity_name(name: str) -> str:
    """The model name in the identity: a staged retune artifact by its digest, wherever the cache lives."""
    if name.startswith("local-dir:"):
        from shared.artifact import staged_digest

        digest = staged_digest(Path(name[len("local-dir:"):]))
        if digest is not None:
            return f"retune-artifact:{digest}"
    return name


@lru_cache(maxsize=2)
def cached_backbone(spec: str) -> Backbone:
    """:func:`load_backbone` once per process (a hospital runtime, a simulation, a server building LoRA towers)."""
    return load_backbone(spec)


def load_backbone(spec: str = OFFLINE_DEFAULT, device: torch.device | str | None = None) -> Backbone:
    """Build the frozen backbone named by ``spec`` (see the module docstring)."""
    name, tag = resolve_spec(spec)
    device = torch.device(device) if device is not None else default_device()
    pretrained = bool(tag) or name.startswith(("hf-hub:", "local-dir:"))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_INIT_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag or None, device=device,
                                                                         **_staged_text_tower(name))
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, RuntimeError, ValueError) as exc:
        hint = ("this machine may be offline: stage the model in a local directory (open_clip_config.json + "
                "weights) and pass that directory as --backbone") if pretrained else "check the model name"
        raise RetuneError(f"could not load backbone {spec!r}: {exc}; {hint}") from exc
    model.eval().requires_grad_(False)
    with torch.inference_mode():
        size = model.visual.preprocess_cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        embed_dim = int(model.encode_image(torch.zeros(1, 3, *size, device=device)).shape[-1])
    identity = hashlib.sha256(json.dumps({
        "model": _identity_name(name), "tag": tag, "weights": _state_hash(model),
        "preprocess": model.visual.preprocess_cfg, "open_clip": open_clip.__version__,
    }, sort_keys=True, default=str).encode()).hexdigest()
    backbone = Backbone(spec=spec, model=model, preprocess=preprocess, tokenizer=tokenizer, embed_dim=embed_dim,
                        pretrained=pretrained, identity=identity, device=device)
    log.info("backbone %s: embed_dim=%d identity=%s", backbone.label, embed_dim, identity[:12])
    return backbone
