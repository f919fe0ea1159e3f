"""Hospitals differ by scanner style: the same patients look different at different sites."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from research.phantom import hospital_style, render_case, sample_case


def _render_at(hospital: int, n: int = 16, size: int = 96) -> np.ndarray:
    """The same n patients (drawn at hospital 0) imaged by ``hospital``'s scanner."""
    cases = [dataclasses.replace(sample_case(i, 0, 0), hospital=hospital) for i in range(n)]
    return np.stack([render_case(c, size) for c in cases]).astype(float)


def _high_frequency(x: np.ndarray) -> float:
    """Mean absolute Laplacian: grows with noise, shrinks with blur."""
    lap = x[:, 1:-1, 1:-1] - 0.25 * (x[:, :-2, 1:-1] + x[:, 2:, 1:-1] + x[:, 1:-1, :-2] + x[:, 1:-1, 2:])
    return float(np.abs(lap).mean())


def test_style_is_deterministic_in_hospital_and_seed() -> None:
    assert hospital_style(2, 7) == hospital_style(2, 7)
    assert hospital_style(2, 7) != hospital_style(2, 8)
    assert hospital_style(2, 7).to_dict()["hospital"] == 2


def test_same_patients_look_different_at_each_hospital() -> None:
    renders = {k: _render_at(k) for k in range(4)}
    for a, b in itertools.combinations(renders, 2):
        assert np.abs(renders[a] - renders[b]).mean() > 8, (a, b)
    means = [r.mean() for r in renders.values()]
    stds = [r.std() for r in renders.values()]
    sharpness = [_high_frequency(r) for r in renders.values()]
    assert max(means) - min(means) > 10
    assert max(stds) - min(stds) > 3
    assert max(sharpness) / min(sharpness) > 1.2


def test_labels_and_anatomy_do_not_depend_on_style() -> None:
    case = sample_case(5, 0, 0)
    restyled = dataclasses.replace(case, hospital=3)
    assert not np.array_equal(render_case(case, 64), render_case(restyled, 64))
    assert np.array_equal(case.labels, restyled.labels)


def test_archive_family_is_a_scanner_population_simulate_never_draws() -> None:
    """The default backbone pretrains on ``archive`` sites; ``retune simulate`` draws ``clinical`` ones."""
    clinical = [hospital_style(k, 0) for k in range(64)]
    archive = [hospital_style(1000 + k, 1000, "archive") for k in range(64)]
    assert {s.family for s in clinical} == {"clinical"} and {s.family for s in archive} == {"archive"}
    assert max(s.contrast for s in clinical) < min(s.contrast for s in archive)
    assert max(s.gamma for s in archive) <= min(s.gamma for s in clinical)
    assert max(s.noise for s in archive) < 0.005 and all(s.equalise == 0 for s in archive)
    assert not any(s.marker or any(s.collimation) for s in archive)
    assert any(s.marker for s in clinical) and any(any(s.collimation) for s in clinical)
    case = sample_case(3, 1000, 1000, "archive")
    assert case.family == "archive" and np.array_equal(case.labels, sample_case(3, 1000, 1000, "archive").labels)
    film = render_case(case, 64).astype(float)
    modern = render_case(dataclasses.replace(case, family="clinical"), 64).astype(float)
    assert np.abs(film - modern).mean() > 8


def test_unknown_style_family_is_refused() -> None:
    import pytest

    from shared.errors import RetuneError

    with pytest.raises(RetuneError, match="unknown style family 'film'"):
        hospital_style(0, 0, "film")
