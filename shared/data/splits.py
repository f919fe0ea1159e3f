"""What a label file's splits hold: images listed in two splits, and splits a training run would find empty."""

from __future__ import annotations

import os

import numpy as np

from shared.data.readers import SPLITS, LabelTable
from shared.errors import RetuneError

#: The splits ``retune train`` and a federated site need images in.
NEEDED = ("train", "test")


def split_overlap(table: LabelTable) -> list[dict]:
    """Images listed in more than one split, in file order: ``{"image", "splits", "labels_differ"}``."""
    images = table.frame["image"].map(os.path.normpath)
    repeated = images.duplicated(keep=False).to_numpy()
    out = []
    for image, rows in images[repeated].groupby(images[repeated], sort=False).groups.items():
        splits = [name for name in SPLITS if name in set(table.frame.loc[rows, "split"])]
        if len(splits) > 1:
            labels = table.raw.loc[rows]
            out.append({"image": image, "splits": splits, "labels_differ": len(labels.drop_duplicates()) > 1})
    return out


def require_disjoint_splits(table: LabelTable) -> None:
    """Refuse a label file that lists an image in two splits: a model would be tested on what it trained on."""
    overlap = split_overlap(table)
    if overlap:
        raise RetuneError(f"{table.source}: {_overlap_sentence(overlap)}; a model would be tested on images it "
                          "trained on: give each image one split (retune data check lists them)")


def split_warnings(table: LabelTable, overlap: list[dict], usable: np.ndarray) -> list[str]:
    """Sentences for ``retune data check``: the ``overlap`` (see :func:`split_overlap`), and each split of
    :data:`NEEDED` without a usable image (``usable``: a mask over the rows)."""
    out = [f"{_overlap_sentence(overlap)}: training refuses this"] if overlap else []
    split = table.frame["split"].to_numpy()
    for name in NEEDED:
        rows = int((split == name).sum())
        if rows == 0:
            out.append(f"the {name!r} split has no rows: training needs train and test images (add a 'split' "
                       "column or more rows)")
        elif not usable[split == name].any():
            out.append(f"none of the {rows} image(s) of the {name!r} split is usable (missing or unreadable): "
                       "training needs train and test images")
    return out


def _overlap_sentence(overlap: list[dict]) -> str:
    first = overlap[0]
    labels = " with different labels" if first["labels_differ"] else ""
    return (f"{len(overlap)} image(s) are in more than one split, e.g. {first['image']} in "
            f"{' and '.join(first['splits'])}{labels}")
