"""``retune data check``: read a label file, look for its images and summarise what a training run would see."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from rich.console import Console
from rich.progress import track

from shared.config import EmbedConfig
from shared.data.images import is_npz_ref
from shared.data.problems import BadFiles
from shared.data.readers import Uncertain, read_labels
from shared.data.splits import split_overlap, split_warnings

#: Show a progress bar from this many images on.
PROGRESS_FROM = 500


def check_dataset(path: str | os.PathLike, format: str = "auto", diseases: str | Sequence[str] | None = None,
                  image_root: str | os.PathLike | None = None, verify_images: bool = True,
                  uncertain: Uncertain = "ignore", max_pixels: int = EmbedConfig.max_pixels,
                  allow_outside_paths: bool = False) -> dict:
    """JSON-able summary of a dataset: rows, images found / missing / corrupt, splits and raw label counts.

    Label counts are of the raw values before the uncertain policy (positive = 1, negative = 0,
    uncertain = -1, blank = not given). ``corrupt`` counts every bad file that is there but cannot be used
    (corrupt, unsupported format, empty, unreadable, too large for ``max_pixels``); ``bad_files`` breaks them
    down by reason. Without ``verify_images`` only existence is checked, and npz rows always exist (their
    archive was just read). ``split_overlap`` lists images in more than one split (training refuses them);
    ``warnings`` says so in words, and names a train or test split without a usable image.
    Raises :class:`RetuneError` on an unreadable label file.
    """
    table = read_labels(path, format=format, diseases=diseases, uncertain=uncertain, image_root=image_root,
                        allow_outside_paths=allow_outside_paths)
    bad = BadFiles("skip")
    refs: Iterable[str] = table.frame["image"]
    if len(table) >= PROGRESS_FROM:
        refs = track(refs, description="checking images", total=len(table), console=Console(stderr=True),
                     transient=True)
    for ref in refs:
        if verify_images:
            bad.load(ref, max_pixels)
        elif not is_npz_ref(ref) and not os.path.exists(ref):
            bad.record(ref, "missing", "no such file")
    by_reason = bad.counts()
    missing = by_reason.get("missing", 0)
    raw = table.raw
    overlap = split_overlap(table)
    usable = ~table.frame["image"].isin({b.ref for b in bad.items}).to_numpy()
    return {
        "source": table.source,
        "format": table.format,
        "rows": len(table),
        "images_found": len(table) - len(bad),
        "missing": missing,
        "corrupt": len(bad) - missing,
        "bad_files": by_reason,
        "examples": bad.summary(examples=10)["examples"],
        "splits": {k: int(v) for k, v in table.frame["split"].value_counts().items()},
        "split_overlap": {"count": len(overlap), "examples": overlap[:10]},
        "diseases": {
            d: {
                "positive": int((raw[d] == 1).sum()),
                "negative": int((raw[d] == 0).sum()),
                "uncertain": int((raw[d] == -1).sum()),
                "blank": int(raw[d].isna().sum()),
            }
            for d in table.diseases
        },
        "uncertain_policy": uncertain,
        "verified": verify_images,
        "notes": list(table.notes),
        "warnings": split_warnings(table, overlap, usable),
    }
