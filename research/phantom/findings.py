"""The CheXpert-5 findings as visual patterns: parameters, sampling from a label vector, and rendering.

Findings act in two ways: some change the anatomy (a bigger heart, a raised hemidiaphragm, a shifted mediastinum,
blurred vessels) and all the others replace lung air by an ``opacity`` map in ``[0, 1]``. Severities are drawn
skewed towards mild, so that subtle, hard-to-see cases are common, as in real practice.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from research.phantom.anatomy import Anatomy, Frame
from research.phantom.texture import step, texture

RIGHT, LEFT = -1, 1  # the patient's side; the patient's right lung is on the image left (u < 0)


@dataclass(frozen=True)
class Effusion:
    """Pleural fluid in one hemithorax: ``volume`` 0.05 blunts the costophrenic angle, 1 fills half the lung."""

    side: int
    volume: float


@dataclass(frozen=True)
class Patch:
    """A consolidation: a patchy opacity, optionally bounded by a fissure and holding air bronchograms."""

    side: int
    centre: tuple[float, float]  # (lateral distance from the midline, v)
    radius: tuple[float, float]
    density: float
    fissure: float | None  # v of a fissure bounding the patch from below (lobar pattern), or None
    bronchograms: bool
    tex: tuple[float, float]  # texture-bank offsets of the blob's patchiness and of its bronchograms


@dataclass(frozen=True)
class Edema:
    """Bilateral perihilar (bat-wing) haze with Kerley-B lines and blurred vessels."""

    severity: float
    asymmetry: float  # haze on the weaker side relative to the stronger side
    weaker_side: int
    kerley: float  # prominence of septal lines, 0 = none


@dataclass(frozen=True)
class Atelectasis:
    """Plate-like bands, optional lobar collapse, and volume loss (raised hemidiaphragm, mediastinal shift)."""

    side: int
    bands: tuple[tuple[float, float, float, float, float], ...]  # (r, v, half-length, half-thickness, angle)
    density: float
    dome_raise: float
    shift: float
    collapse: str  # "", "lower" (wedge at the base, medially) or "upper" (right only: raised fissure, opaque apex)


@dataclass(frozen=True)
class Findings:
    """All findings of one image; an empty ``Findings()`` is a normal film."""

    ctr: float | None = None  # cardiomegaly: the enlarged cardiothoracic ratio
    effusions: tuple[Effusion, ...] = ()
    consolidations: tuple[Patch, ...] = ()
    edema: Edema | None = None
    atelectasis: Atelectasis | None = None

    def labels(self) -> np.ndarray:
        """The true CheXpert-5 label vector (Atelectasis, Cardiomegaly, Consolidation, Edema, Effusion)."""
        present = (self.atelectasis, self.ctr, self.consolidations, self.edema, self.effusions)
        return np.array([p is not None and p != () for p in present], dtype=np.float32)


def _severity(rng: np.random.Generator) -> float:
    """Severity in (0, 1), skewed to mild: about a third of cases fall below 0.2."""
    return float(rng.beta(1.0, 1.8))


def _side(rng: np.random.Generator, p_right: float) -> int:
    return RIGHT if rng.random() < p_right else LEFT


def sample_findings(rng: np.random.Generator, labels: np.ndarray, a: Anatomy) -> Findings:
    """Draw visual parameters for each finding present in ``labels`` (CheXpert-5 order)."""
    atel, cardio, consol, edema, effusion = (bool(x) for x in labels)
    f = Findings()
    if cardio:
        f = dataclasses.replace(f, ctr=0.49 + 0.16 * _severity(rng) + abs(rng.normal(0.0, 0.01)))
    if effusion:
        s, kind = _severity(rng), rng.random()
        sides = (RIGHT, LEFT) if kind < 0.4 else ((RIGHT,) if kind < 0.75 else (LEFT,))
        vols = [0.04 + 0.9 * s * (1.0 if i == 0 else rng.uniform(0.3, 1.0)) for i in range(len(sides))]
        f = dataclasses.replace(f, effusions=tuple(Effusion(sd, v) for sd, v in zip(sides, vols)))
    if consol:
        n = 1 + int(rng.random() < 0.25) + int(rng.random() < 0.05)
        f = dataclasses.replace(f, consolidations=tuple(_patch(rng, a) for _ in range(n)))
    if edema:
        s = _severity(rng)
        kerley = float(rng.uniform(0.3, 1.0) * s) if rng.random() < 0.6 else 0.0
        f = dataclasses.replace(f, edema=Edema(s, rng.uniform(0.6, 1.0), _side(rng, 0.5), kerley))
    if atel:
        f = dataclasses.replace(f, atelectasis=_atelectasis(rng, a))
    return f


def _patch(rng: np.random.Generator, a: Anatomy) -> Patch:
    s = _severity(rng)
    side = _side(rng, 0.6)
    v = rng.uniform(a.apex + 0.2, a.dome[0 if side == RIGHT else 1] - 0.05)
    size = 0.07 + 0.16 * s * rng.uniform(0.6, 1.0)
    lobar = side == RIGHT and v < -0.1 and rng.random() < 0.5
    return Patch(
        side=side,
        centre=(rng.uniform(0.3, 0.8) * a.chest_hw, v),
        radius=(size * rng.uniform(0.8, 1.6), size * rng.uniform(0.7, 1.3)),
        density=0.3 + 0.65 * s,
        fissure=v + size * rng.uniform(0.2, 0.7) if lobar else None,
        bronchograms=bool(s > 0.3 and rng.random() < 0.6),
        tex=(float(rng.random()), float(rng.random())),
    )


def _atelectasis(rng: np.random.Generator, a: Anatomy) -> Atelectasis:
    s = _severity(rng)
    side = _side(rng, 0.45)
    dome = a.dome[0 if side == RIGHT else 1]
    bands = tuple(
        (
            rng.uniform(0.3, 0.75) * a.chest_hw,
            dome - rng.uniform(0.06, 0.35),
            rng.uniform(0.07, 0.2),
            rng.uniform(0.01, 0.02) * (1.0 + s),
            rng.normal(0.0, 0.2),
        )
        for _ in range(1 + int(rng.integers(0, 3)))
    )
    collapse = "" if rng.random() > 0.2 + 0.5 * s else ("upper" if side == RIGHT and rng.random() < 0.4 else "lower")
    return Atelectasis(
        side=side,
        bands=bands,
        density=0.2 + 0.45 * s,
        dome_raise=float(rng.uniform(0.03, 0.15) * s) if rng.random() < 0.7 else 0.0,
        shift=float(rng.uniform(0.0, 0.05) * s) if rng.random() < 0.5 else 0.0,
        collapse=collapse,
    )


def apply_to_anatomy(a: Anatomy, f: Findings) -> Anatomy:
    """The anatomy as the findings deform it (heart size, dome height, mediastinal shift, vessel blur)."""
    if f.ctr is not None:
        a = dataclasses.replace(a, ctr=f.ctr, heart_hh=a.heart_hh * (1.0 + 0.6 * (f.ctr - 0.5)))
    if f.edema is not None:
        s = f.edema.severity
        a = dataclasses.replace(a, vessel_blur=0.3 + 0.7 * s, vessel_gain=a.vessel_gain * (1.0 - 0.3 * s))
    if f.atelectasis is not None:
        at = f.atelectasis
        domes = list(a.dome)
        domes[0 if at.side == RIGHT else 1] -= at.dome_raise
        shift = a.mediastinum_shift + at.side * at.shift
        a = dataclasses.replace(a, dome=(domes[0], domes[1]), mediastinum_shift=shift)
    return a


def _union(acc: np.ndarray, o: np.ndarray) -> np.ndarray:
    """Combine two opacities as independent absorbers."""
    return 1.0 - (1.0 - acc) * (1.0 - np.clip(o, 0.0, 1.0))


def render_findings(fr: Frame, a: Anatomy, f: Findings) -> np.ndarray:
    """Opacity map (fraction of lung air replaced) of all findings, given the deformed anatomy ``a``."""
    opacity = np.zeros_like(fr.u)
    for e in f.effusions:
        opacity = _union(opacity, _effusion(fr, a, e))
    for p in f.consolidations:
        opacity = _union(opacity, _consolidation(fr, p))
    if f.edema is not None:
        opacity = _union(opacity, _edema(fr, a, f.edema))
    if f.atelectasis is not None:
        opacity = _union(opacity, _atelectasis_map(fr, a, f.atelectasis))
    return opacity


def _effusion(fr: Frame, a: Anatomy, e: Effusion) -> np.ndarray:
    """Dependent fluid with a meniscus rising to the lateral chest wall; hides the costophrenic angle and dome."""
    r = e.side * fr.du
    cp = a.dome[0 if e.side == RIGHT else 1] + a.dome_depth
    height = 0.05 + 0.6 * e.volume
    surface = cp - height * (0.25 + 0.75 * np.clip(r / a.chest_hw, 0.0, 1.0) ** 2)
    fluid = np.clip((fr.v - surface) / (0.02 + 0.06 * e.volume + fr.edge), 0.0, 1.0)
    if a.ap:  # a supine film layers the fluid behind the lung: a veil densest at the base
        fluid = fluid + 0.25 * e.volume * np.clip((fr.v - a.apex) / (cp - a.apex), 0.0, 1.0)
    return fluid * step(r, 0.02)


def _consolidation(fr: Frame, p: Patch) -> np.ndarray:
    """Patchy airspace opacity: a noisy blob, optionally cut by a fissure and crossed by air bronchograms."""
    q = ((p.side * fr.du - p.centre[0]) / p.radius[0]) ** 2 + ((fr.v - p.centre[1]) / p.radius[1]) ** 2
    blob = np.clip(np.exp(-q) * (1.6 + 0.5 * texture(fr.size, 1, p.tex[0])) - 0.3, 0.0, 1.0)
    if p.fissure is not None:
        blob = blob * fr.step(p.fissure - fr.v, 0.01)
    if p.bronchograms:
        tubes = fr.step(0.25 - np.abs(texture(fr.size, 1, p.tex[1])), 0.1)
        blob = blob * (1.0 - 0.35 * tubes * step(blob - 0.7, 0.2))
    return p.density * blob


def _edema(fr: Frame, a: Anatomy, e: Edema) -> np.ndarray:
    """Perihilar bat-wing haze fading to the periphery, plus short horizontal septal lines at the bases."""
    weaker = fr.left if e.weaker_side == LEFT else 1.0 - fr.left
    sigma_r = 0.15 + 0.12 * e.severity
    haze = np.exp(-(((fr.r - 0.18) / sigma_r) ** 2) - ((fr.v + 0.02) / 0.32) ** 2)
    medium = texture(fr.size, 1, a.tex[3])
    opacity = (0.05 + 0.7 * e.severity) * (1.0 - (1.0 - e.asymmetry) * weaker) * haze * (0.8 + 0.25 * medium)
    if e.kerley > 0:
        phase = fr.v / 0.03
        lines = fr.step(0.18 - np.abs(phase - np.rint(phase)), 0.12)
        patchy = step(texture(fr.size, 0, a.tex[4]) - 0.2, 0.4)
        periphery = step(fr.r - 0.82 * a.chest_hw, 0.05) * step(fr.v, 0.1)
        opacity = opacity + 0.5 * e.kerley * lines * patchy * periphery
    return opacity


def _atelectasis_map(fr: Frame, a: Anatomy, at: Atelectasis) -> np.ndarray:
    """Plate-like bands and an optional lobar collapse on one side."""
    r, v = at.side * fr.du, fr.v
    opacity = np.zeros_like(r)
    for br, bv, half_len, half_thick, angle in at.bands:
        c, s = math.cos(angle), math.sin(angle)
        along, across = (r - br) * c + (v - bv) * s, (v - bv) * c - (r - br) * s
        opacity = opacity + fr.step(half_thick - np.abs(across), 0.012) * step(half_len - np.abs(along), 0.06)
    if at.collapse == "lower":
        edge = (0.12 + 0.4 * np.clip((v + 0.05) / (fr.dome + 0.05), 0.0, 1.0)) * a.chest_hw
        opacity = opacity + 0.7 * fr.step(edge - r, 0.03) * step(v + 0.05, 0.05)
    elif at.collapse == "upper":
        fissure = -0.3 + 0.15 * (r / a.chest_hw)
        opacity = opacity + 0.7 * fr.step(fissure - v, 0.015) + fr.step(0.006 - np.abs(v - fissure), 0.004)
    return at.density * opacity * step(r, 0.02)
