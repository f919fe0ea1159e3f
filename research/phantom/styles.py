"""Per-hospital scanner style (tone curve, exposure, noise, blur, processing, collimation, burned-in marker) and
prevalence skew. Hospital K's style is a pure function of ``(hospital, seed, family)``.

Two style families: ``clinical`` (the default: the modern, varied sites ``retune phantom`` and ``retune simulate``
generate) and ``archive`` (a digitised-film pretraining archive: steep film tone curves, little noise, no
local-contrast processing, no collimation or markers, higher prevalence). The offline default backbone is
pretrained on ``archive`` sites only, so clinical hospitals meet a real domain gap.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from shared.errors import RetuneError
from research.phantom.texture import lowpass, noise

_STYLE_SALT = 0x57E1E  # separates the style stream from the per-image streams
_GLYPHS = {  # 5x7 bitmaps of the side markers radiographers burn into the film
    "L": ("10000",) * 6 + ("11111",),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
}


@dataclass(frozen=True)
class StyleFamily:
    """Ranges one family of sites draws its styles from: ``(low, width)`` pairs, except ``gamma`` and ``skew``,
    which are ``(low, high)`` drawn log-uniformly."""

    contrast: tuple[float, float]
    gamma: tuple[float, float]
    noise: tuple[float, float]
    blur: tuple[float, float]
    equalise: tuple[float, float]
    collimated: float  # share of sites that collimate
    markers: bool  # whether sites burn in side markers
    skew: tuple[float, float]  # range of the prevalence multipliers (log-uniform)


STYLE_FAMILIES: dict[str, StyleFamily] = {
    "clinical": StyleFamily(contrast=(2.0, 1.2), gamma=(0.75, 1.35), noise=(0.003, 0.012), blur=(0.0, 1.3),
                            equalise=(0.0, 0.6), collimated=0.6, markers=True, skew=(0.5, 2.0)),
    "archive": StyleFamily(contrast=(3.4, 1.0), gamma=(0.55, 0.75), noise=(0.001, 0.003), blur=(0.9, 0.7),
                           equalise=(0.0, 0.0), collimated=0.0, markers=False, skew=(1.0, 2.5)),
}


@dataclass(frozen=True)
class HospitalStyle:
    """How one hospital's scanner and processing render density to pixels, and which patients it sees.

    Pixel lengths (``blur``, ``grain``) are given for 256 px images and scale with the image size.
    """

    hospital: int
    contrast: float  # slope of the tanh tone curve
    centre: float  # density rendered mid-grey (exposure)
    gamma: float  # display gamma applied after the tone curve
    exposure_jitter: float  # per-image standard deviation of ``centre``
    noise: float  # quantum-noise standard deviation, in density units
    grain: float  # noise correlation length (px)
    blur: float  # detector blur (Gaussian sigma, px)
    equalise: float  # strength of large-radius local-contrast processing
    collimation: tuple[float, float, float, float]  # top, bottom, left, right margins (fraction of the side)
    border: float  # intensity of the collimated margins (0 black, 1 white)
    marker: str  # burned-in side marker, "" for none
    marker_pos: tuple[float, float]  # marker's top-left corner (fractions of height and width)
    ap_fraction: float  # share of AP (portable) films
    skew: tuple[float, ...]  # prevalence multipliers s_d per CheXpert-5 disease (clinical: in [0.5, 2])
    family: str = "clinical"  # the StyleFamily it was drawn from

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Kronecker steps of the most visible parameters: hospital K takes ``frac(offset + K * step)`` of each range, so
#: consecutive hospitals land far apart (golden-ratio spacing) instead of by chance close together.
_SPREAD_STEPS = {"contrast": 0.618034, "gamma": 0.414214, "noise": 0.732051, "blur": 0.236068, "equalise": 0.645751}


def _span(bounds: tuple[float, float], u: float) -> float:
    low, width = bounds
    return low + width * u


@lru_cache(maxsize=512)
def hospital_style(hospital: int, seed: int = 0, family: str = "clinical") -> HospitalStyle:
    """The deterministic style of hospital ``hospital`` under generator seed ``seed``, drawn from ``family``."""
    if hospital < 0 or seed < 0:
        raise RetuneError(f"hospital ({hospital}) and seed ({seed}) must be non-negative integers")
    if family not in STYLE_FAMILIES:
        raise RetuneError(f"unknown style family {family!r}: use one of {', '.join(STYLE_FAMILIES)}")
    fam = STYLE_FAMILIES[family]
    offsets = np.random.default_rng((_STYLE_SALT, seed)).random(len(_SPREAD_STEPS))
    u = {k: (o + hospital * step) % 1.0 for (k, step), o in zip(_SPREAD_STEPS.items(), offsets)}
    rng = np.random.default_rng((_STYLE_SALT, seed, hospital))
    collimate = rng.random() < fam.collimated
    margins = tuple(float(m) if collimate else 0.0 for m in rng.uniform(0.0, 0.07, 4))
    marker = str(rng.choice(["", "L", "R"]))
    corner = (rng.uniform(0.04, 0.14), rng.uniform(0.05, 0.15) if rng.random() < 0.5 else rng.uniform(0.8, 0.9))
    lo, hi = fam.gamma
    return HospitalStyle(
        hospital=hospital,
        contrast=_span(fam.contrast, u["contrast"]),
        centre=rng.uniform(0.26, 0.34),
        gamma=float(lo * (hi / lo) ** u["gamma"]),
        exposure_jitter=rng.uniform(0.01, 0.035),
        noise=_span(fam.noise, u["noise"]),
        grain=rng.uniform(0.0, 1.5),
        blur=_span(fam.blur, u["blur"]),
        equalise=_span(fam.equalise, u["equalise"]),
        collimation=margins,  # type: ignore[arg-type]
        border=float(rng.choice([0.0, 0.85, 1.0])),
        marker=marker if fam.markers else "",
        marker_pos=corner,
        ap_fraction=rng.uniform(0.1, 0.6),
        skew=tuple(float(s) for s in np.exp(rng.uniform(*np.log(fam.skew), 5))),
        family=family,
    )


def _marker(img: np.ndarray, style: HospitalStyle, jitter: np.ndarray) -> None:
    """Burn the side marker (white glyph) into ``img`` in place."""
    glyph = np.array([[c == "1" for c in row] for row in _GLYPHS[style.marker]])
    size = img.shape[0]
    k = max(1, round(0.07 * size / 7))
    mask = np.kron(glyph, np.ones((k, k), dtype=bool))
    top, left = (int((p + j) * size) for p, j in zip(style.marker_pos, jitter))
    top, left = min(max(top, 0), size - mask.shape[0]), min(max(left, 0), size - mask.shape[1])
    img[top : top + mask.shape[0], left : left + mask.shape[1]][mask] = 0.97


def apply_style(density: np.ndarray, style: HospitalStyle, rng: np.random.Generator) -> np.ndarray:
    """Render a density map to an 8-bit image the way ``style``'s scanner would; ``rng`` gives this image's noise.

    Detector blur is not applied here: ``patient_frame`` softens every drawn edge by ``style.blur`` instead.
    """
    size = density.shape[0]
    px = size / 256.0
    d = density
    if style.equalise > 0:
        d = d + style.equalise * (d - lowpass(d, 16))
    sign = 1.0 if rng.random() < 0.5 else -1.0
    d = d + sign * style.noise * (0.5 + np.clip(d, 0.0, 1.0)) * noise(size, style.grain * px, rng)
    centre = style.centre + rng.normal(0.0, style.exposure_jitter)
    img = (0.5 + 0.5 * np.tanh(style.contrast * (d - centre))) ** style.gamma
    jitter = rng.uniform(-0.015, 0.015, 6)
    top, bottom, left, right = (max(int((m + j) * size), 0) if m > 0 else 0 for m, j in zip(style.collimation, jitter))
    img[:top] = img[size - bottom :] = style.border
    img[:, :left] = img[:, size - right :] = style.border
    if style.marker:
        _marker(img, style, jitter[4:])
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
