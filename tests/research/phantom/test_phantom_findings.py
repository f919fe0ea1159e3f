"""Each finding changes the pixels where it should, and only there."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from research.phantom import PhantomCase, render_case, sample_case
from research.phantom.anatomy import lung_mask, patient_frame
from research.phantom.findings import LEFT, RIGHT, Atelectasis, Edema, Effusion, Findings, Patch

SIZE = 128


@pytest.fixture(scope="module")
def normal() -> PhantomCase:
    """A fixed, upright, normal patient (no breast shadow or gastric bubble to confound regions)."""
    case = sample_case(11, hospital=0, seed=0)
    anatomy = dataclasses.replace(
        case.anatomy, rotation=0.0, shift=(0.0, 0.0), scale=0.95, ap=False, ctr=0.44, mediastinum_shift=0.0,
        chest_hw=0.74, dome=(0.36, 0.4), dome_depth=0.2, heart_offset=0.66, breasts=0.0, gastric_bubble=0.0,
    )
    return dataclasses.replace(case, anatomy=anatomy, findings=Findings())


def _delta(case: PhantomCase, findings: Findings) -> np.ndarray:
    """Finding image minus normal image (same patient, same noise), as float."""
    after = render_case(dataclasses.replace(case, findings=findings), SIZE).astype(float)
    return after - render_case(case, SIZE).astype(float)


def _regions(case: PhantomCase):
    frame = patient_frame(SIZE, case.anatomy)
    return frame, lung_mask(frame, case.anatomy) > 0.95


def test_cardiomegaly_widens_the_cardiac_silhouette(normal: PhantomCase) -> None:
    a = normal.anatomy
    f, _ = _regions(normal)
    delta = _delta(normal, Findings(ctr=0.62))
    border = lambda ctr: 2.0 * a.heart_offset * ctr * a.chest_hw  # noqa: E731 - the heart's left border (image right)
    level = np.abs(f.v - (a.dome[1] - 0.12)) < 0.06
    widened = level & (f.du > border(0.44) + 0.03) & (f.du < border(0.62) - 0.03)
    apex = (f.v < -0.45) & (f.r > 0.25)
    assert widened.sum() > 20 and delta[widened].mean() > 25
    assert abs(delta[apex].mean()) < 2


@pytest.mark.parametrize("side", [RIGHT, LEFT])
def test_effusion_brightens_the_lower_lateral_lung_on_its_side(normal: PhantomCase, side: int) -> None:
    a = normal.anatomy
    f, lungs = _regions(normal)
    delta = _delta(normal, Findings(effusions=(Effusion(side, 0.5),)))
    cp = a.dome[0 if side == RIGHT else 1] + a.dome_depth
    lower = lungs & (f.v > cp - 0.22) & (side * f.du > 0.55 * a.chest_hw)
    other = lungs & (f.v > cp - 0.22) & (-side * f.du > 0.55 * a.chest_hw)
    upper = lungs & (f.v < -0.3)
    assert lower.sum() > 10 and delta[lower].mean() > 25
    assert abs(delta[other].mean()) < 2 and abs(delta[upper].mean()) < 2


def test_consolidation_brightens_its_patch(normal: PhantomCase) -> None:
    f, lungs = _regions(normal)
    patch = Patch(RIGHT, (0.42, -0.15), (0.14, 0.12), 0.85, None, False, (0.3, 0.6))
    delta = _delta(normal, Findings(consolidations=(patch,)))
    core = lungs & (np.hypot(-f.du - 0.42, f.v + 0.15) < 0.05)
    contralateral = lungs & (f.du > 0.2)
    assert core.sum() > 5 and delta[core].mean() > 25
    assert abs(delta[contralateral].mean()) < 2


def test_edema_brightens_both_perihilar_regions(normal: PhantomCase) -> None:
    f, lungs = _regions(normal)
    delta = _delta(normal, Findings(edema=Edema(0.8, 0.8, LEFT, 0.0)))
    hilar = lungs & (f.r > 0.17) & (f.r < 0.35) & (np.abs(f.v) < 0.15)
    periphery = lungs & (f.r > 0.6) & (np.abs(f.v) < 0.15)
    for side in (f.du < 0, f.du > 0):
        assert delta[hilar & side].mean() > 15
    assert periphery.sum() > 10 and delta[hilar].mean() > 2 * abs(delta[periphery].mean())


def test_atelectasis_band_and_raised_hemidiaphragm(normal: PhantomCase) -> None:
    a = normal.anatomy
    f, lungs = _regions(normal)
    band = (0.45, a.dome[0] - 0.25, 0.15, 0.02, 0.0)
    delta = _delta(normal, Findings(atelectasis=Atelectasis(RIGHT, (band,), 0.7, 0.1, 0.0, "")))
    on_band = lungs & (np.abs(-f.du - 0.45) < 0.1) & (np.abs(f.v - band[1]) < 0.012)
    above_dome = lungs & (-f.du > 0.3) & (-f.du < 0.5) & (f.v > a.dome[0] - 0.06) & (f.v < a.dome[0] - 0.01)
    left_lung = lungs & (f.du > 0.2)
    assert on_band.sum() > 3 and delta[on_band].mean() > 20
    assert above_dome.sum() > 3 and delta[above_dome].mean() > 25
    assert abs(delta[left_lung].mean()) < 2
