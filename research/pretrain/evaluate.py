"""Measure a backbone on phantom hospitals like ``retune simulate``'s, through the real path.

Phantom PNGs and manifests are written with :func:`research.phantom.write_phantom` (hospitals 0..N-1, seed 0, 128 px
by default, the 70/10/20 split of the manifest), read with the manifest reader, embedded through
:class:`shared.cache.EmbeddingCache`, then scored zero-shot with the RE-tune prompts and with adaptors trained
centrally (:func:`client.centralized.train_centralized`, default configuration) on the pooled training splits.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from shared.labels import CHEXPERT5


def evaluate_backbone(spec: str, work: Path, hospitals: int = 5, images_per_hospital: int = 600, size: int = 128,
                      seed: int = 0, show_progress: bool = False) -> dict:
    """Zero-shot and centrally trained adaptor metrics of backbone ``spec`` on phantom hospitals 0..hospitals-1.

    ``work`` holds the phantom folders (reused when already written with the same parameters) and the cache.
    """
    from client.centralized import train_centralized
    from client.incremental import Split
    from client.local_data import embed_splits, prompt_embeddings
    from shared.backbone import load_backbone
    from shared.cache import EmbeddingCache
    from shared.data.problems import BadFiles
    from shared.data.readers import read_labels
    from research.phantom import write_phantom
    from shared.prompts import PromptBank

    work = Path(work)
    backbone = load_backbone(spec, device="cpu")
    cache = EmbeddingCache(work / "cache", backbone)
    splits: dict[str, list[Split]] = {"train": [], "val": [], "test": []}
    for k in range(hospitals):
        folder = work / f"phantom-h{k}-s{seed}-n{images_per_hospital}-{size}px"
        if not (folder / "manifest.csv").is_file():
            write_phantom(folder, images_per_hospital, hospital=k, seed=seed, size=size)
        table = read_labels(folder / "manifest.csv", format="manifest", diseases=",".join(CHEXPERT5))
        for name, split in embed_splits(table, cache, BadFiles("fail"), show_progress).items():
            splits[name].append(split)
    pooled = {name: Split(np.concatenate([s.embeddings for s in parts]), np.concatenate([s.labels for s in parts]))
              for name, parts in splits.items()}
    prompts = prompt_embeddings(cache, PromptBank(CHEXPERT5))
    run = train_centralized(pooled["train"], pooled["test"], prompts, CHEXPERT5)
    return {
        "data": {"hospitals": list(range(hospitals)), "seed": seed, "size": size,
                 "images_per_hospital": images_per_hospital,
                 "images": {name: int(len(split.labels)) for name, split in pooled.items()}},
        "backbone": backbone.describe(),
        "embed_precision": cache.precision,
        "zero_shot": {"macro_auroc": run.metrics["zero_shot"]["macro_auroc"],
                      "per_class_auroc": run.metrics["zero_shot"]["per_class_auroc"]},
        "adaptors": {"macro_auroc": run.metrics["macro_auroc"], "per_class_auroc": run.metrics["per_class_auroc"],
                     "train_s": run.metrics["train_s"]},
    }


def evaluate_artifact(folder: Path, work: Path | None = None, **kwargs) -> dict:
    """:func:`evaluate_backbone` of a built artifact, staged in a scratch cache and loaded through ``local-dir:``."""
    from shared.artifact import stage

    with tempfile.TemporaryDirectory(prefix="retune-eval-") as tmp:
        staged = stage(folder, cache_root=Path(tmp))
        return evaluate_backbone(f"local-dir:{staged}", Path(work) if work else Path(tmp), **kwargs)
