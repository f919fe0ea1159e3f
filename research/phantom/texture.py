"""Small numeric helpers the phantom renderer shares: pixel grid, soft steps, a cached noise-texture bank, blurs."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

#: Correlation lengths (fraction of the image side) of the texture bank's fields: fine, medium, coarse.
TEXTURE_SCALES: tuple[float, ...] = (0.006, 0.02, 0.06)
_BANK_SEED = 20_241_123  # fixed: the bank is part of the generator's definition, not of any one image


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)`` in ``[-1, 1]``; x grows rightwards, y downwards (float32)."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2.0 - 1.0
    x, y = np.meshgrid(c, c)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def step(d: np.ndarray, width: float) -> np.ndarray:
    """Soft step: 0 where ``d << 0``, 1 where ``d >> 0``, linear over ``width`` around 0."""
    t = d * (1.0 / width)
    t += 0.5
    return np.clip(t, 0.0, 1.0, out=t)


@lru_cache(maxsize=4)
def texture_bank(size: int) -> np.ndarray:
    """Unit-variance smooth noise fields ``[len(TEXTURE_SCALES), 4*size, size]`` (float32), fixed forever.

    Tall and one image wide, so that any window is a contiguous row range (a free view).
    """
    rng = np.random.default_rng(_BANK_SEED)
    f = np.fft.fftfreq(4 * size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2
    fields = []
    for scale in TEXTURE_SCALES:
        sigma = max(scale * size, 0.7)
        spectrum = np.fft.fft2(rng.standard_normal((4 * size, size))) * np.exp(-2.0 * (np.pi * sigma) ** 2 * f)
        field = np.fft.ifft2(spectrum).real
        fields.append((field - field.mean()) / field.std())
    bank = np.stack(fields).astype(np.float32)
    bank.setflags(write=False)
    return bank


def texture(size: int, scale: int, offset: float) -> np.ndarray:
    """The ``size x size`` window of bank field ``scale`` at fractional row ``offset`` in ``[0, 1)`` (a view)."""
    oy = int(offset * 3 * size)
    return texture_bank(size)[scale, oy : oy + size]


@lru_cache(maxsize=32)
def noise_bank(size: int, grain_px: float) -> np.ndarray:
    """Unit-variance white noise ``[8*size, size]`` smoothed by a Gaussian of ``grain_px`` pixels; fixed forever."""
    noise = np.random.default_rng(_BANK_SEED + 1).standard_normal((8 * size, size), dtype=np.float32)
    if grain_px >= 0.25:
        noise = ndimage.gaussian_filter(noise, grain_px, truncate=2.5, mode="wrap")
    noise = (noise / noise.std()).astype(np.float32)
    noise.setflags(write=False)
    return noise


def noise(size: int, grain_px: float, rng: np.random.Generator) -> np.ndarray:
    """A random ``size x size`` window of the noise bank (a view); callers may flip its sign for variety."""
    oy = int(rng.integers(0, 7 * size))
    return noise_bank(size, round(grain_px, 2))[oy : oy + size]


@lru_cache(maxsize=8)
def _pooling(size: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Box-average matrix ``[m, size]`` and bilinear upsampling matrix ``[size, m]`` for ``m = size // factor``."""
    m = max(size // factor, 1)
    block = np.arange(size) * m // size
    down = np.zeros((m, size), dtype=np.float32)
    down[block, np.arange(size)] = 1.0
    down /= down.sum(axis=1, keepdims=True)
    pos = np.clip((np.arange(size) + 0.5) * m / size - 0.5, 0.0, m - 1.0)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, m - 1)
    up = np.zeros((size, m), dtype=np.float32)
    np.add.at(up, (np.arange(size), lo), 1.0 - (pos - lo))
    np.add.at(up, (np.arange(size), hi), pos - lo)
    return down, up


def lowpass(img: np.ndarray, factor: int) -> np.ndarray:
    """Cheap wide blur: box-average to ``size // factor`` blocks, then bilinear upsampling (two small matmuls)."""
    down, up = _pooling(img.shape[0], factor)
    return up @ (down @ img @ down.T) @ up.T
