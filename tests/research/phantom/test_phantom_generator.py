"""Determinism, chunking independence, splits and input checks of the phantom generator."""

from __future__ import annotations

import numpy as np
import pytest

from shared.errors import RetuneError
from research.phantom import generate, iter_batches, render_case, sample_case, split_of


def test_same_seed_gives_identical_bytes() -> None:
    a_img, a_lab = generate(6, hospital=1, seed=3, size=64)
    b_img, b_lab = generate(6, hospital=1, seed=3, size=64)
    assert a_img.dtype == np.uint8 and a_img.shape == (6, 64, 64)
    assert a_lab.dtype == np.float32 and a_lab.shape == (6, 5)
    assert a_img.tobytes() == b_img.tobytes()
    assert np.array_equal(a_lab, b_lab)


def test_different_seed_or_hospital_changes_images() -> None:
    base, _ = generate(4, hospital=0, seed=0, size=64)
    other_seed, _ = generate(4, hospital=0, seed=1, size=64)
    other_hospital, _ = generate(4, hospital=1, seed=0, size=64)
    assert base.tobytes() != other_seed.tobytes()
    assert base.tobytes() != other_hospital.tobytes()
    assert all(not np.array_equal(base[i], other_seed[i]) for i in range(4))


def test_images_do_not_depend_on_n_start_or_chunking() -> None:
    full, full_lab = generate(9, hospital=2, seed=5, size=48)
    tail, tail_lab = generate(4, hospital=2, seed=5, size=48, start=5)
    assert np.array_equal(full[5:], tail) and np.array_equal(full_lab[5:], tail_lab)
    chunks = list(iter_batches(9, hospital=2, seed=5, size=48, batch=2))
    assert [len(c[0]) for c in chunks] == [2, 2, 2, 2, 1]
    assert np.array_equal(np.concatenate([c[0] for c in chunks]), full)
    alone = render_case(sample_case(7, hospital=2, seed=5), size=48)
    assert np.array_equal(alone, full[7])


def test_images_look_like_a_radiograph() -> None:
    """Dark lungs, bright mediastinum: the centre column is brighter than the mid-lung fields."""
    images, _ = generate(16, hospital=0, seed=0, size=128)
    mid = images[:, 35:65].astype(float)
    centre, lungs = mid[:, :, 58:70].mean(), np.concatenate([mid[:, :, 25:45], mid[:, :, 83:103]], axis=2).mean()
    assert centre > lungs + 40
    assert images.std() > 30


def test_splits_are_deterministic_and_near_70_10_20() -> None:
    splits = [split_of(i, 0, 0) for i in range(3000)]
    assert splits == [split_of(i, 0, 0) for i in range(3000)]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.7) < 0.03 and abs(share["val"] - 0.1) < 0.02 and abs(share["test"] - 0.2) < 0.03


def test_label_noise_flips_a_few_percent() -> None:
    cases = [sample_case(i, 0, 0) for i in range(3000)]
    true = np.stack([c.labels for c in cases])
    observed = np.stack([c.observed for c in cases])
    assert 0.01 < (true != observed).mean() < 0.05
    assert np.array_equal(true, np.stack([c.findings.labels() for c in cases]))


@pytest.mark.parametrize("kwargs", [{"hospital": -1}, {"seed": -2}, {"size": 8}, {"n": -1}])
def test_bad_arguments_raise_retune_error(kwargs: dict) -> None:
    args = {"n": 2, "hospital": 0, "seed": 0, "size": 64} | kwargs
    with pytest.raises(RetuneError):
        generate(**args)
