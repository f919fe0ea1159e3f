"""The real CheXpert-5 label co-occurrence table, hospital prevalence skew, and report-like label noise.

The table (``research/assets/chexpert5_cooccurrence.json``) holds the joint probability of the 32 combinations of
the five labels in CheXpert's frontal training images; ``bench/derive_cooccurrence.py`` documents how it was made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from shared.errors import RetuneError
from shared.labels import CHEXPERT5

TABLE_PATH = Path(__file__).resolve().parents[1] / "assets" / "chexpert5_cooccurrence.json"

#: Report-derived label noise: P(manifest 0 | finding present), P(manifest 1 | finding absent). About 2.5 % of
#: all label entries flip at CheXpert-like prevalence, the order of labeller error against radiologists.
LABEL_NOISE: tuple[float, float] = (0.06, 0.015)
_REMAKE = "restore it from git or re-make it with bench/derive_cooccurrence.py"


@dataclass(frozen=True)
class JointTable:
    """Joint distribution of binary label vectors: ``combos[i]`` has probability ``probs[i]``."""

    diseases: tuple[str, ...]
    combos: np.ndarray  # [32, 5] float32, 0/1
    probs: np.ndarray  # [32] float64, sums to 1
    provenance: dict

    def skewed(self, skew: tuple[float, ...] | np.ndarray) -> np.ndarray:
        """Combination probabilities reweighted by per-disease multipliers: ``w ∝ p · Π_d s_d^{y_d}``."""
        w = self.probs * np.prod(np.asarray(skew, dtype=np.float64) ** self.combos, axis=1)
        return w / w.sum()

    def marginals(self, skew: tuple[float, ...] | np.ndarray | None = None) -> np.ndarray:
        """Per-disease prevalence, optionally under a hospital's skew."""
        p = self.probs if skew is None else self.skewed(skew)
        return p @ self.combos


@lru_cache(maxsize=2)
def load_table(path: Path = TABLE_PATH) -> JointTable:
    """Read and check the co-occurrence table."""
    try:
        doc = json.loads(Path(path).read_text())
        combos = np.array([c["labels"] for c in doc["combos"]], dtype=np.float32)
        probs = np.array([c["p"] for c in doc["combos"]], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RetuneError(f"cannot read the co-occurrence table {path}: {exc}; {_REMAKE}") from exc
    if tuple(doc["diseases"]) != CHEXPERT5 or combos.shape != (32, 5) or abs(probs.sum() - 1.0) > 1e-6:
        raise RetuneError(f"co-occurrence table {path} is not a 32-row CheXpert-5 joint; {_REMAKE}")
    provenance = {k: v for k, v in doc.items() if k != "combos"}
    return JointTable(CHEXPERT5, combos, probs / probs.sum(), provenance)


def sample_labels(rng: np.random.Generator, probs: np.ndarray, table: JointTable) -> np.ndarray:
    """Draw one label vector (float32 [5]) from combination probabilities ``probs``."""
    return table.combos[rng.choice(len(probs), p=probs)].copy()


def add_label_noise(
    rng: np.random.Generator, labels: np.ndarray, noise: tuple[float, float] = LABEL_NOISE
) -> np.ndarray:
    """Flip labels as a report labeller would: positives missed with ``noise[0]``, negatives called with ``noise[1]``."""
    flip = rng.random(labels.shape) < np.where(labels > 0.5, noise[0], noise[1])
    return np.where(flip, 1.0 - labels, labels).astype(np.float32)
