"""``retune phantom`` writes N images and a manifest, and reports user errors without a traceback."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import typer
from PIL import Image
from typer.testing import CliRunner

from deploy.cli_phantom import phantom
from research.phantom import generate


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(phantom)
    return app


def test_cli_writes_n_images_and_manifest(tmp_path: Path) -> None:
    out = tmp_path / "site3"
    args = ["--out", str(out), "--n", "7", "--hospital", "3", "--seed", "1", "--size", "64"]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    assert "wrote 7 images" in result.output and "manifest.csv" in result.output
    assert len(list((out / "images").glob("*.png"))) == 7
    with (out / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 7 and {r["hospital"] for r in rows} == {"3"}
    params = json.loads((out / "phantom.json").read_text())  # the options reached the generator
    assert (params["n"], params["hospital"], params["seed"], params["size"]) == (7, 3, 1, 64)
    images, _ = generate(7, hospital=3, seed=1, size=64)
    for i, row in enumerate(rows):
        assert np.array_equal(np.asarray(Image.open(out / row["image"])), images[i]), row["image"]


def test_cli_reports_bad_arguments(tmp_path: Path) -> None:
    result = CliRunner().invoke(_app(), ["--out", str(tmp_path / "x"), "--n", "0"])
    assert result.exit_code == 1
    assert "error:" in result.output and "--n" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
