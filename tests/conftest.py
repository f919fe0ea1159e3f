"""Shared fixtures: a tiny, randomly initialised backbone (fast) is loaded once per test session; app copies."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.backbone import Backbone, load_backbone

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    return load_backbone("retune-tiny-random", device="cpu")


@pytest.fixture
def png_files(tmp_path):
    """Six small 8-bit greyscale PNGs with different content; returns their paths as strings."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (80, 80), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


#: What an app folder for ``flwr run`` / ``flwr build`` holds (the FAB keeps .py/.toml/.md/.json/.yaml of these).
APP_PARTS = ("pyproject.toml", "README.md", "client", "server", "shared")


def make_app(folder: Path, edit: Callable[[Path], None] | None = None) -> Path:
    """A copy of this repository's Flower app in ``folder`` (optionally edited), ready for ``flwr run``."""
    folder.mkdir(parents=True, exist_ok=True)
    for part in APP_PARTS:
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, folder / part, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
        else:
            shutil.copy(source, folder / part)
    if edit is not None:
        edit(folder)
    return folder


def fab_of(app: Path) -> bytes:
    """The app package (FAB) Flower builds from ``app``, byte for byte what ``flwr run`` sends."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app)
