"""Write a phantom data set to disk: 8-bit PNGs, the project's generic manifest CSV, and ``phantom.json``."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from shared import __version__
from shared.errors import RetuneError
from shared.labels import CHEXPERT5
from research.phantom.cooccurrence import LABEL_NOISE, load_table
from research.phantom.generator import SPLITS, render_case, sample_case, split_of
from research.phantom.styles import hospital_style

MANIFEST_NAME = "manifest.csv"
PARAMS_NAME = "phantom.json"
MANIFEST_COLUMNS: tuple[str, ...] = ("image", "split", "patient", "hospital", *CHEXPERT5)


def image_name(index: int, hospital: int) -> str:
    """The manifest path of image ``index`` relative to the manifest's folder."""
    return f"images/h{hospital}_{index:06d}.png"


def patient_id(index: int, hospital: int, seed: int) -> str:
    """One phantom patient per image; the id is unique across hospitals and seeds."""
    return f"phantom-s{seed}-h{hospital}-{index:06d}"


def write_phantom(
    out_dir: Path | str,
    n: int,
    hospital: int = 0,
    seed: int = 0,
    size: int = 256,
    *,
    start: int = 0,
    family: str = "clinical",
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write images ``start .. start+n-1`` of hospital ``hospital`` under ``out_dir`` and return the manifest path.

    Layout: ``out_dir/images/h{K}_{index:06d}.png``, ``out_dir/manifest.csv`` (columns ``MANIFEST_COLUMNS``,
    labels are the noisy report-derived ones, 1/0) and ``out_dir/phantom.json`` (generator parameters).
    ``progress`` is called with the number of images written so far after each image.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RetuneError(f"phantom output {out} exists and is not a folder: choose another --out")
    if n < 1:
        raise RetuneError(f"cannot write {n} phantom images: --n must be at least 1")
    sample_case(start, hospital, seed, family)  # validates hospital, seed and family before anything is written
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, index in enumerate(range(start, start + n)):
        case = sample_case(index, hospital, seed, family)
        name = image_name(index, hospital)
        Image.fromarray(render_case(case, size)).save(out / name, compress_level=3)
        row = {"image": name, "split": split_of(index, hospital, seed), "patient": patient_id(index, hospital, seed)}
        rows.append({**row, "hospital": hospital, **{d: int(y) for d, y in zip(CHEXPERT5, case.observed)}})
        if progress is not None:
            progress(k + 1)
    manifest = out / MANIFEST_NAME
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / PARAMS_NAME).write_text(json.dumps(phantom_params(n, hospital, seed, size, start, family), indent=1) + "\n")
    return manifest


def phantom_params(n: int, hospital: int, seed: int, size: int, start: int = 0, family: str = "clinical") -> dict:
    """The provenance record written to ``phantom.json``."""
    style = hospital_style(hospital, seed, family)
    table = load_table()
    return {
        "generator": f"retune-fl {__version__} research.phantom",
        "n": n,
        "start": start,
        "hospital": hospital,
        "seed": seed,
        "size": size,
        "style": style.to_dict(),
        "prevalence": dict(zip(CHEXPERT5, (round(float(p), 5) for p in table.marginals(style.skew)))),
        "label_noise": {"p_positive_to_negative": LABEL_NOISE[0], "p_negative_to_positive": LABEL_NOISE[1]},
        "splits": dict(SPLITS),
        "cooccurrence": table.provenance,
    }
