"""The phantom must not be trivially easy: no finding is separable by a global intensity statistic."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from shared.labels import CHEXPERT5
from research.phantom import generate, sample_case

MAX_GLOBAL_AUROC = 0.75


def _auroc(score: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUROC from ranks (ties averaged)."""
    ranks = rankdata(score)
    pos = y > 0.5
    n1, n0 = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def test_no_finding_is_separable_by_global_intensity_statistics() -> None:
    n, hospital = 1000, 0
    images, _ = generate(n, hospital=hospital, seed=0, size=128)
    truth = np.stack([sample_case(i, hospital, 0).labels for i in range(n)])
    flat = images.reshape(n, -1).astype(np.float32)
    stats = {"mean": flat.mean(1), "std": flat.std(1)}
    stats |= {f"p{q}": np.percentile(flat, q, axis=1) for q in (5, 25, 50, 75, 95)}
    for d, disease in enumerate(CHEXPERT5):
        assert 20 < truth[:, d].sum() < n - 20, disease
        for name, score in stats.items():
            auc = _auroc(score, truth[:, d])
            assert max(auc, 1 - auc) < MAX_GLOBAL_AUROC, (disease, name, auc)
