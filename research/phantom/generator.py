"""Phantom cases: each image draws its labels, anatomy and findings from its own stream seeded by
``(seed, hospital, index)``, so any image can be regenerated alone and nothing depends on ``n`` or on chunking."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from shared.errors import RetuneError
from research.phantom.anatomy import Anatomy, patient_frame, render_anatomy, sample_anatomy
from research.phantom.cooccurrence import add_label_noise, load_table, sample_labels
from research.phantom.findings import Findings, apply_to_anatomy, render_findings, sample_findings
from research.phantom.styles import apply_style, hospital_style

_IMAGE_SALT = 0x1A6E
#: Deterministic split shares (percent), assigned by a hash of the image's identity.
SPLITS: tuple[tuple[str, int], ...] = (("train", 70), ("val", 10), ("test", 20))


@dataclass(frozen=True)
class PhantomCase:
    """Everything that defines one phantom image; ``render_case`` turns it into pixels."""

    index: int
    hospital: int
    seed: int
    labels: np.ndarray  # true findings shown in the image, float32 [5] in CHEXPERT5 order
    observed: np.ndarray  # the report-derived (noisy) labels written to the manifest
    anatomy: Anatomy
    findings: Findings
    noise_seed: int
    family: str = "clinical"  # the hospital's style family (see research.phantom.styles)


def _check(hospital: int, seed: int, size: int | None = None, n: int | None = None) -> None:
    if hospital < 0 or seed < 0:
        raise RetuneError(f"hospital ({hospital}) and seed ({seed}) must be non-negative integers")
    if size is not None and not 32 <= size <= 2048:
        raise RetuneError(f"phantom image size {size} is out of range: use 32 to 2048 pixels")
    if n is not None and n < 0:
        raise RetuneError(f"cannot generate {n} images: n must be 0 or more")


def sample_case(index: int, hospital: int = 0, seed: int = 0, family: str = "clinical") -> PhantomCase:
    """Draw image ``index`` of hospital ``hospital`` (of style family ``family``) under ``seed`` (cheap: no pixels)."""
    _check(hospital, seed)
    style = hospital_style(hospital, seed, family)
    table = load_table()
    rng = np.random.default_rng((_IMAGE_SALT, seed, hospital, index))
    labels = sample_labels(rng, table.skewed(style.skew), table)
    observed = add_label_noise(rng, labels)
    anatomy = sample_anatomy(rng, style.ap_fraction)
    findings = sample_findings(rng, labels, anatomy)
    return PhantomCase(index, hospital, seed, labels, observed, anatomy, findings, int(rng.integers(2**63)), family)


def render_case(case: PhantomCase, size: int = 256) -> np.ndarray:
    """Render ``case`` in its hospital's style to a ``size x size`` uint8 image."""
    _check(case.hospital, case.seed, size)
    style = hospital_style(case.hospital, case.seed, case.family)
    anatomy = apply_to_anatomy(case.anatomy, case.findings)
    frame = patient_frame(size, anatomy, style.blur)
    density = render_anatomy(frame, anatomy, render_findings(frame, anatomy, case.findings))
    return apply_style(density, style, np.random.default_rng(case.noise_seed))


def iter_batches(
    n: int, hospital: int = 0, seed: int = 0, size: int = 256, *, start: int = 0, batch: int = 64
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(images uint8 [b, size, size], labels float32 [b, 5])`` for images ``start .. start+n-1``."""
    _check(hospital, seed, size, n)
    for lo in range(start, start + n, batch):
        cases = [sample_case(i, hospital, seed) for i in range(lo, min(lo + batch, start + n))]
        yield np.stack([render_case(c, size) for c in cases]), np.stack([c.observed for c in cases])


def generate(
    n: int, hospital: int = 0, seed: int = 0, size: int = 256, *, start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """All ``n`` images and their manifest (noisy) labels in memory: uint8 ``[n, size, size]``, float32 ``[n, 5]``."""
    _check(hospital, seed, size, n)
    images = np.empty((n, size, size), dtype=np.uint8)
    labels = np.empty((n, 5), dtype=np.float32)
    k = 0
    for imgs, labs in iter_batches(n, hospital, seed, size, start=start):
        images[k : k + len(imgs)], labels[k : k + len(imgs)] = imgs, labs
        k += len(imgs)
    return images, labels


def split_of(index: int, hospital: int = 0, seed: int = 0) -> str:
    """The deterministic train/val/test split of one image (70/10/20 by a hash of its identity)."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{hospital}:{index}".encode(), digest_size=8).digest(), "big") % 100
    for name, share in SPLITS:
        if h < share:
            return name
        h -= share
    raise AssertionError("split shares must sum to 100")
