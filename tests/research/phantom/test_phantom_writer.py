"""write_phantom: PNGs, the generic manifest CSV, and phantom.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.errors import RetuneError
from shared.labels import CHEXPERT5
from research.phantom import generate, write_phantom


def test_writes_images_manifest_and_params(tmp_path: Path) -> None:
    calls: list[int] = []
    manifest = write_phantom(tmp_path / "h2", 12, hospital=2, seed=4, size=64, progress=calls.append)
    assert manifest == tmp_path / "h2" / "manifest.csv" and calls == list(range(1, 13))
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == ["image", "split", "patient", "hospital", *CHEXPERT5]
    assert [r["image"] for r in rows] == [f"images/h2_{i:06d}.png" for i in range(12)]
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    assert len({r["patient"] for r in rows}) == 12 and {r["hospital"] for r in rows} == {"2"}
    assert all(r[d] in ("0", "1") for r in rows for d in CHEXPERT5)

    images, labels = generate(12, hospital=2, seed=4, size=64)
    for i, row in enumerate(rows):
        png = Image.open(manifest.parent / row["image"])
        assert png.mode == "L" and png.size == (64, 64)
        assert np.array_equal(np.asarray(png), images[i])
        assert [int(row[d]) for d in CHEXPERT5] == labels[i].astype(int).tolist()

    params = json.loads((manifest.parent / "phantom.json").read_text())
    assert (params["n"], params["hospital"], params["seed"], params["size"]) == (12, 2, 4, 64)
    assert set(params["prevalence"]) == set(CHEXPERT5) and params["style"]["hospital"] == 2
    assert params["cooccurrence"]["rows"] > 100_000


def test_rewriting_is_byte_identical(tmp_path: Path) -> None:
    a = write_phantom(tmp_path / "a", 3, hospital=1, seed=0, size=48)
    b = write_phantom(tmp_path / "b", 3, hospital=1, seed=0, size=48)
    assert a.read_bytes() == b.read_bytes()
    for name in ("h1_000000.png", "h1_000002.png"):
        assert (a.parent / "images" / name).read_bytes() == (b.parent / "images" / name).read_bytes()


def test_bad_output_or_count_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RetuneError, match="not a folder"):
        write_phantom(blocker, 2)
    with pytest.raises(RetuneError, match="at least 1"):
        write_phantom(tmp_path / "empty", 0)
    with pytest.raises(RetuneError):
        write_phantom(tmp_path / "neg", 2, hospital=-1)
    assert not (tmp_path / "neg").exists()
