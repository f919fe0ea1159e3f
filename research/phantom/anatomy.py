"""Normal chest anatomy of one phantom patient: parameters, sampling, and rendering to a density map.

Coordinates: the image spans ``x, y`` in ``[-1, 1]`` (x rightwards, y downwards). The patient frame ``(u, v)``
is the image frame shifted, rotated and scaled by the patient's positioning. As on a PA radiograph the patient's
right lung is on the image left (``u < 0``). Density is unitless: soft tissue about 0.55, aerated lung about 0.1,
bone adds 0.05 to 0.15; the display maps higher density to brighter pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from research.phantom.texture import grid, step, texture

AIR_DEPTH = 0.38  # density removed by a full thickness of aerated lung


@dataclass(frozen=True)
class Anatomy:
    """Geometry and habitus of one patient; every length is in patient-frame units (image half-width = 1)."""

    rotation: float  # in-plane rotation (radians)
    scale: float  # patient size relative to the field of view
    shift: tuple[float, float]  # patient centre offset in the image (x, y)
    ap: bool  # AP projection: magnified heart, higher and flatter clavicles
    chest_hw: float  # inner thoracic half-width at the bases
    body_hw: float  # outer body half-width (chest wall soft tissue outside the ribs)
    soft: float  # soft-tissue density at the midline (habitus)
    apex: float  # v of the lung apices
    dome: tuple[float, float]  # v of the right and left hemidiaphragm tops (image left, image right)
    dome_depth: float  # how far the costophrenic angles lie below the dome tops
    mediastinum_shift: float  # u of the mediastinal midline
    mediastinum_hw: float  # upper mediastinum half-width
    ctr: float  # cardiothoracic ratio (heart width / inner thoracic width)
    heart_offset: float  # fraction of the heart width lying right of the midline (image right), above 0.5
    heart_hh: float  # heart half-height
    rib_spacing: float
    rib_phase: float
    clavicle_v: float  # v of the clavicles' medial ends
    bone: float  # bone density
    breasts: float  # breast shadow density (0 = none)
    gastric_bubble: float  # radius of the gastric air bubble (0 = none)
    vessel_gain: float  # prominence of the pulmonary vessels
    vessel_blur: float  # indistinctness of the vessel markings in [0, 1] (edema blurs them)
    tex: tuple[float, ...]  # fractional texture-bank offsets: fine, medium, coarse, and two spares for findings


def sample_anatomy(rng: np.random.Generator, ap_fraction: float) -> Anatomy:
    """Draw one normal patient; ``ap_fraction`` is the chance of an AP (portable) film."""
    ap = bool(rng.random() < ap_fraction)
    chest_hw = rng.uniform(0.66, 0.8)
    inspiration = rng.uniform(-1.0, 1.0)  # deep inspiration lowers the domes and narrows the heart
    dome_r = 0.36 + 0.09 * inspiration + rng.normal(0.0, 0.02)
    ctr = float(np.clip(rng.normal(0.445, 0.035) - 0.025 * inspiration + (0.03 if ap else 0.0), 0.36, 0.52))
    return Anatomy(
        rotation=float(rng.normal(0.0, 0.035)),
        scale=rng.uniform(0.86, 1.04),
        shift=(float(rng.normal(0.0, 0.025)), float(rng.normal(0.02, 0.03))),
        ap=ap,
        chest_hw=chest_hw,
        body_hw=chest_hw + rng.uniform(0.07, 0.2),
        soft=rng.uniform(0.5, 0.62),
        apex=rng.uniform(-0.8, -0.7) + (0.04 if ap else 0.0),
        dome=(dome_r, dome_r + rng.uniform(0.0, 0.06)),
        dome_depth=rng.uniform(0.14, 0.26),
        mediastinum_shift=float(rng.normal(0.0, 0.015)),
        mediastinum_hw=rng.uniform(0.09, 0.13),
        ctr=ctr,
        heart_offset=rng.uniform(0.6, 0.72),
        heart_hh=rng.uniform(0.3, 0.36),
        rib_spacing=rng.uniform(0.12, 0.145),
        rib_phase=rng.uniform(-0.9, -0.85),
        clavicle_v=rng.uniform(-0.66, -0.58) - (0.05 if ap else 0.0),
        bone=rng.uniform(0.07, 0.12),
        breasts=float(rng.uniform(0.04, 0.12)) if rng.random() < 0.45 else 0.0,
        gastric_bubble=float(rng.uniform(0.04, 0.09)) if rng.random() < 0.6 else 0.0,
        vessel_gain=rng.uniform(0.7, 1.2),
        vessel_blur=0.0,
        tex=tuple(float(t) for t in rng.random(5)),
    )


@dataclass(frozen=True)
class Frame:
    """Per-pixel patient-frame quantities that the anatomy and findings renderers share."""

    u: np.ndarray
    v: np.ndarray
    du: np.ndarray  # u relative to the mediastinal midline
    r: np.ndarray  # |du|: distance from the midline
    au: np.ndarray  # |u|
    left: np.ndarray  # 1 over the patient's left hemithorax (image right), else 0
    dome: np.ndarray  # v of the diaphragm under each pixel
    edge: float  # extra edge softness (patient units) that stands in for detector blur

    @property
    def size(self) -> int:
        return self.u.shape[0]

    def step(self, d: np.ndarray, width: float) -> np.ndarray:
        """A soft step whose edge is also softened by the detector blur."""
        return step(d, width + self.edge)

    def sided(self, right: float, left: float) -> np.ndarray:
        """``right`` over the patient's right hemithorax, ``left`` over the patient's left."""
        return right + (left - right) * self.left


def patient_frame(size: int, a: Anatomy, blur_px: float = 0.0) -> Frame:
    """The patient frame of every pixel; ``blur_px`` (at 256 px) softens every edge like detector blur."""
    x, y = grid(size)
    c, s = math.cos(a.rotation), math.sin(a.rotation)
    xs, ys = x - a.shift[0], y - a.shift[1]
    u, v = (xs * c + ys * s) / a.scale, (ys * c - xs * s) / a.scale
    du = u - a.mediastinum_shift
    left = (du >= 0).astype(np.float32)
    au = np.abs(u)
    rr = au / a.chest_hw
    top = a.dome[0] + (a.dome[1] - a.dome[0]) * left
    dome = top + a.dome_depth * ((rr - 0.4) / 0.6) ** 2 + 0.02 * (1.0 - np.clip(rr / 0.4, 0.0, 1.0))
    return Frame(u, v, du, np.abs(du), au, left, dome, 2.5 * blur_px / 128.0 / a.scale)


def lung_mask(f: Frame, a: Anatomy) -> np.ndarray:
    """Soft mask of both lung fields (1 inside), bounded by chest wall, mediastinum and diaphragm."""
    widest = f.sided(a.dome[0] - 0.1, a.dome[1] - 0.1)
    t = np.clip((widest - f.v) / (widest - a.apex), 0.0, 1.0)
    wall = a.chest_hw * np.sqrt(1.0 - t * t)
    knob = 0.05 * np.exp(-(((f.v + 0.32) / 0.07) ** 2)) * f.left  # aortic knob
    return f.step(wall - f.au, 0.025) * f.step(f.r - a.mediastinum_hw - knob, 0.02) * f.step(f.dome - f.v, 0.015)


def heart_mask(f: Frame, a: Anatomy) -> np.ndarray:
    """Soft mask of the cardiac silhouette; its full width is ``ctr * 2 * chest_hw``."""
    hw = a.ctr * a.chest_hw * (1.08 if a.ap else 1.0)
    centre = (2.0 * a.heart_offset - 1.0) * hw
    dv = f.v - (a.dome[1] - 0.05)
    q = ((f.du - centre - 0.3 * dv) / hw) ** 2 + (dv / a.heart_hh) ** 2
    return f.step(1.0 - q, 0.12)


def _ribs(f: Frame, a: Anatomy) -> np.ndarray:
    """Posterior (curved, near horizontal) and fainter anterior (oblique) rib shadows."""
    r, v = f.r, f.v - a.rib_phase
    post = (v + 0.4 * r - 1.05 * r * r) / (a.rib_spacing * (1.0 + 0.25 * v))
    d = np.abs(post - np.rint(post))
    posterior = f.step(0.17 - d, 0.1) * step(post + 0.4, 0.2) * step(8.5 - post, 0.6)
    lat = a.chest_hw - r
    ant = (v + 0.1 - 0.7 * lat + 0.4 * lat * lat) / (1.4 * a.rib_spacing)
    d = np.abs(ant - np.rint(ant))
    anterior = 0.45 * f.step(0.2 - d, 0.12) * step(r - 0.25, 0.1) * step(6.5 - ant, 0.3)
    return (posterior + anterior) * step(r - 0.08, 0.03) * step(lat + 0.05, 0.03) * step(a.dome[1] + 0.3 - f.v, 0.25)


def _clavicles(f: Frame, a: Anatomy) -> np.ndarray:
    """Two bone bars from the sternal notch outwards, rising laterally (flatter on AP films)."""
    r0, v0, r1 = 0.07, a.clavicle_v, 0.62
    v1 = v0 - (0.05 if a.ap else 0.12)
    dr, dv = f.r - r0, f.v - v0
    t = np.clip((dr * (r1 - r0) + dv * (v1 - v0)) / ((r1 - r0) ** 2 + (v1 - v0) ** 2), 0.0, 1.0)
    ex, ey = dr - t * (r1 - r0), dv - t * (v1 - v0)
    return f.step(0.028 - np.sqrt(ex * ex + ey * ey), 0.012)


def _vessels(f: Frame, a: Anatomy, warp: np.ndarray, fine: np.ndarray) -> np.ndarray:
    """Pulmonary vessels: tapering lines radiating from both hila, plus the hilar shadows themselves."""
    r, dv = f.r - 0.16, f.v - f.sided(-0.06, -0.1)
    rho = np.sqrt(r * r + dv * dv)
    lines = np.abs(np.sin(8.0 * np.arctan2(dv, r) + 1.6 * warp))
    trunks = f.step(0.5 * np.exp(-rho / 0.5) - lines, 0.15 + 0.4 * a.vessel_blur) * np.exp(-rho / 0.45)
    twigs = f.step(0.12 - np.abs(fine), 0.1) * step(rho - 0.12, 0.1) * np.exp(-rho / 0.6)
    return trunks * (0.7 + 0.3 * fine) + (0.5 - 0.4 * a.vessel_blur) * twigs + 1.1 * np.exp(-((rho / 0.08) ** 2))


def render_anatomy(f: Frame, a: Anatomy, opacity: np.ndarray) -> np.ndarray:
    """Density map of the patient; ``opacity`` in ``[0, 1]`` is the fraction of lung air that findings replace."""
    u, v, au = f.u, f.v, f.au
    fine, medium, coarse = (texture(f.size, k, a.tex[k]) for k in range(3))

    shoulders = f.step(v + 0.95 - 0.25 * (au / a.body_hw) ** 2, 0.05)
    body = np.maximum(shoulders, f.step(0.22 - au, 0.03)) * np.sqrt(np.clip(1.0 - (u / a.body_hw) ** 2, 0.0, 1.0))
    density = a.soft * body * (1.0 + 0.03 * coarse)

    lungs = lung_mask(f, a)
    heart = heart_mask(f, a)
    thickness = np.sqrt(np.clip(1.0 - ((au - 0.5 * a.chest_hw) / (0.7 * a.chest_hw)) ** 2, 0.05, 1.0))
    base = np.clip((f.dome - v) / 0.2, 0.0, 1.0)
    air = lungs * thickness * (0.7 + 0.3 * base) * (1.0 - 0.9 * heart)
    density -= AIR_DEPTH * air * (1.0 - opacity)
    markings = 0.06 * a.vessel_gain * _vessels(f, a, coarse + 0.5 * medium, medium) + 0.012 * fine + 0.01 * medium
    density += lungs * (1.0 - 0.7 * heart) * markings

    if a.breasts > 0:
        q = ((au - 0.5 * a.chest_hw) / 0.36) ** 2 + ((v - a.dome[0] + 0.02) / 0.26) ** 2
        density += a.breasts * np.sqrt(np.clip(1.0 - q, 0.0, 1.0))
    if a.gastric_bubble > 0:
        bx, by = f.du - 0.38 * a.chest_hw, (v - a.dome[1] - 0.1) * 1.4
        bubble = f.step(a.gastric_bubble - np.sqrt(bx * bx + by * by), 0.01) * step(v - f.dome - 0.02, 0.02)
        density -= 0.18 * bubble

    trachea = f.step(0.032 - np.abs(f.du + 0.01 * (v + 1.0)), 0.012) * step(-0.28 - v, 0.04)
    spine = f.step(0.065 - f.r, 0.015) * (0.85 + 0.15 * np.cos(2.0 * np.pi * v / 0.085))
    bones = a.bone * (0.55 * _ribs(f, a) + 1.3 * _clavicles(f, a) + 0.6 * spine) * body
    return density - 0.09 * trachea * body + bones
