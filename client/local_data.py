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


def embed_splits(table: LabelTable, cache: EmbeddingCache, bad: BadFiles, show_progress: bool = True
                 ) -> dict[str, Split]:
    """Embed every image of ``table`` through ``cache``; unreadable images go to ``bad`` and are left out. A table
    that lists an image in two splits is refused before anything is embedded."""
    require_disjoint_splits(table)
    embeddings, ok = cache.images(list(table.frame["image"]), bad, show_progress)
    labels = table.labels()
    split = table.frame["split"].to_numpy()
    return {name: Split(embeddings[ok & (split == name)], labels[ok & (split == name)])
            for name in ("train", "val", "test")}


def require_rows(splits: dict[str, Split], *names: str) -> None:
    """Fail clearly when a split the command needs has no usable image."""
    for name in names:
        if len(splits[name].labels) == 0:
            raise RetuneError(f"no usable images in the {name!r} split: add a 'split' column to the manifest "
                              "or check the image paths (retune data check shows what was found)")


def prompt_embeddings(cache: EmbeddingCache, bank: PromptBank) -> Prompts:
    """Embed (through the cache) every prompt of ``bank``."""
    return Prompts(cache.texts(bank.texts()), bank.averaging_matrix())
