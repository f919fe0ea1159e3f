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


def tiny_resnet_clip():
    """A tiny, randomly initialised open_clip CLIP with a ResNet image tower (its attention pool has q_proj and
    v_proj, as the offline default's has) and a transformer text tower: frozen, in eval mode."""
    import open_clip
    import torch
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = open_clip.model.CLIP(
            embed_dim=16, vision_cfg=CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=32, head_width=16),
            text_cfg=CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=2, layers=1))
    return clip.eval().requires_grad_(False)


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
