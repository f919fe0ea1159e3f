"""Scoring images with a saved checkpoint: what ``retune predict``, ``retune ask`` and the report drafts share.

:func:`score_images` opens (and, given the consortium's public key, verifies) a checkpoint, loads the backbone it
was trained on, embeds the images through the cache and returns a :class:`Scored`: per-disease logits, plus the
adapted image features and a way to adapt any text the same way, so that answers and report sentences are scored
in the space the checkpoint was trained in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from shared.errors import RetuneError
from shared.prompts import PromptBank


def open_checkpoint(folder: Path, public_key: Path | None, console: Console):
    """Load a checkpoint, after verifying the consortium's signature when a public key is given."""
    from shared.checkpoint import load_checkpoint
    from shared.signing import verify_checkpoint

    if public_key is not None:
        verify_checkpoint(folder, public_key)
    else:
        console.print("[yellow]checkpoint signature not checked: pass --public-key consortium.pub to verify it")
    return load_checkpoint(folder)


def check_backbone(identity: str, sidecar: dict) -> None:
    """Refuse a backbone other than the one the checkpoint's adaptors were trained on."""
    if sidecar["backbone"]["identity"] != identity:
        raise RetuneError("the checkpoint's adaptors were trained on a different backbone (weights or "
                          f"preprocessing differ from {sidecar['backbone']['spec']!r}); use the same backbone")


#: Texts embedded per pass (a report bank holds thousands of sentences).
TEXT_BATCH = 256


@dataclass
class Scored:
    """Images scored by a checkpoint.

    ``logits`` [N, C] (rows of unreadable images are meaningless: see ``ok``), ``image_features`` [N, d] the
    adapted, L2-normalised image features the logits compare with the adapted prompts.
    """

    bank: PromptBank
    backbone_label: str
    logits: np.ndarray
    ok: np.ndarray
    image_features: torch.Tensor
    model: torch.nn.Module
    store: object  # shared.cache.EmbeddingCache

    @property
    def probabilities(self) -> np.ndarray:
        """sigmoid(logits) [N, C]."""
        return torch.sigmoid(torch.as_tensor(self.logits)).numpy()

    @torch.inference_mode()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Adapted, L2-normalised features [len(texts), d] of any texts (through the cache, or through the adapted
        text tower when LoRA adapts it)."""
        model, out = self.model, []
        for start in range(0, len(texts), TEXT_BATCH):
            chunk = texts[start:start + TEXT_BATCH]
            inputs = self.store.texts(chunk) if model.text_tower is None else self.store.backbone.tokenizer(chunk)
            out.append(F.normalize(model.text_adaptor(model.prompt_embeddings(inputs)), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, model.dim)


@torch.inference_mode()
def score_images(checkpoint: Path, images: list[Path], cache: Path, public_key: Path | None,
                 console: Console) -> Scored:
    """Score ``images`` with the checkpoint in ``checkpoint`` (unreadable images are reported and marked)."""
    from client.local_data import prompt_embeddings
    from client.trainer import embed_images
    from shared.backbone import cached_backbone
    from shared.cache import EmbeddingCache
    from shared.data.problems import BadFiles, print_bad_files

    model, bank, sidecar = open_checkpoint(checkpoint, public_key, console)
    bb = cached_backbone(sidecar["backbone"]["spec"])
    check_backbone(bb.identity, sidecar)
    store = EmbeddingCache(cache, bb)
    bad = BadFiles("skip")
    refs = [str(p) for p in images]
    inputs, ok = store.images(refs, bad, show_progress=len(images) > 50)
    print_bad_files(bad, console)
    if model.image_tower is not None:  # LoRA adapts the image tower: it runs on the preprocessed images
        if not ok.any():
            raise RetuneError("none of the images could be read")
        pixels = store.pixels([r for r, good in zip(refs, ok) if good])
        inputs = np.zeros((len(refs), *pixels.shape[1:]), dtype=pixels.dtype)
        inputs[ok] = pixels
    prompts = prompt_embeddings(store, bank, tokens=model.text_tower is not None)
    embedded = embed_images(model, inputs)
    logits = model.score(embedded, model.prompt_embeddings(prompts.inputs(model)), prompts.averaging).numpy()
    features = F.normalize(model.image_adaptor(embedded), dim=-1)
    return Scored(bank, bb.label, logits, np.asarray(ok, dtype=bool), features, model, store)
