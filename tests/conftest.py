"""Shared fixtures: a tiny, randomly initialised backbone (fast) is loaded once per test session."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from shared.backbone import Backbone, load_backbone


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
