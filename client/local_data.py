"""A hospital's local data, embedded: label table -> cached embeddings per split. Nothing here leaves the site."""

from __future__ import annotations

from client.incremental import Split
from client.trainer import Prompts
from shared.cache import EmbeddingCache
from shared.data.problems import BadFiles
from shared.data.readers import LabelTable
from shared.data.splits import require_disjoint_splits
from shared.errors import RetuneError
from shared.prompts import PromptBank


def embed_splits(table: LabelTable, cache: EmbeddingCache, bad: BadFiles, show_progress: bool = True,
                 pixels: bool = False) -> dict[str, Split]:
    """Embed every image of ``table`` through ``cache``; unreadable images go to ``bad`` and are left out. A table
    that lists an image in two splits is refused before anything is embedded. With ``pixels`` each split also
    holds its preprocessed images (for LoRA in the image tower)."""
    require_disjoint_splits(table)
    refs = list(table.frame["image"])
    embeddings, ok = cache.images(refs, bad, show_progress)
    labels = table.labels()
    split = table.frame["split"].to_numpy()
    out = {}
    for name in ("train", "val", "test"):
        rows = ok & (split == name)
        images = cache.pixels([r for r, keep in zip(refs, rows) if keep]) if pixels else None
        out[name] = Split(embeddings[rows], labels[rows], images)
    return out


def require_rows(splits: dict[str, Split], *names: str) -> None:
    """Fail clearly when a split the command needs has no usable image."""
    for name in names:
        if len(splits[name].labels) == 0:
            raise RetuneError(f"no usable images in the {name!r} split: add a 'split' column to the manifest "
                              "or check the image paths (retune data check shows what was found)")


def prompt_embeddings(cache: EmbeddingCache, bank: PromptBank, tokens: bool = False) -> Prompts:
    """Embed (through the cache) every prompt of ``bank``; with ``tokens``, keep their token ids too (for LoRA in
    the text tower)."""
    ids = cache.backbone.tokenizer(bank.texts()) if tokens else None
    return Prompts(cache.texts(bank.texts()), bank.averaging_matrix(), ids)
