"""A cache disk that is read-only or full: ``retune embed`` stops with one clear line, not a traceback. Real
filesystems: a tmpfs mounted (read-only, or 24 kB) in a mount namespace of the test's own."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

UNSHARE = shutil.which("unshare")


def _namespaces_work() -> bool:
    return bool(UNSHARE) and subprocess.run([UNSHARE, "-r", "-m", "true"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _namespaces_work(), reason="needs unshare -r -m (user and mount namespaces)")


def _manifest(folder: Path, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    rows = ["image,split,Edema"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{'train' if i % 2 else 'test'},{i % 2}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def _embed_on(mount_options: str, tmp_path: Path) -> subprocess.CompletedProcess:
    cache = tmp_path / "cache"
    cache.mkdir()
    embed = [sys.executable, "-c", "from deploy.cli import main; main()", "embed", "--data",
             str(_manifest(tmp_path)), "--backbone", "retune-tiny-random", "--cache", str(cache)]
    script = f'mount -t tmpfs -o {mount_options} tmpfs "{cache}" && exec "$@"'
    return subprocess.run([UNSHARE, "-r", "-m", "sh", "-c", script, "sh", *embed], capture_output=True, text=True,
                          timeout=300, env={"COLUMNS": "300", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                          cwd=Path(__file__).resolve().parents[2])


@pytest.mark.parametrize("options, why", [("ro", "Read-only file system"), ("size=24k", "No space left on device")])
def test_a_read_only_or_full_cache_disk_is_one_clear_error(tmp_path, options, why):
    result = _embed_on(options, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"cannot write the embedding cache {tmp_path / 'cache'}: {why}" in lines[0]
    assert "Traceback" not in result.stderr


def test_the_same_embedding_on_a_roomy_tmpfs_succeeds(tmp_path):
    """The control: the same command on a writable tmpfs with room embeds every image."""
    result = _embed_on("size=8m", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"train": 20' in result.stdout and '"test": 20' in result.stdout
