"""Metrics on logits: macro/per-class AUROC, F1, accuracy, and forgetting over a task matrix."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import f1_score


def _labelled(labels: np.ndarray, column: int) -> np.ndarray:
    return ~np.isnan(labels[:, column])


def auroc(y: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of binary labels ``y`` (both classes present) as the Mann-Whitney U statistic over average ranks (ties
    count half): sklearn's ``roc_auc_score``, without its input validation, which dominates a hospital's evaluate."""
    positive = y == 1
    n_pos = int(positive.sum())
    n_neg = len(y) - n_pos
    return float((rankdata(scores)[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_class_auroc(logits: np.ndarray, labels: np.ndarray, diseases: tuple[str, ...]) -> dict[str, float | None]:
    """AUROC per disease on its labelled rows; ``None`` where the rows hold a single class."""
    result: dict[str, float | None] = {}
    for c, disease in enumerate(diseases):
        keep = _labelled(labels, c)
        y = labels[keep, c]
        result[disease] = auroc(y, logits[keep, c]) if len(np.unique(y)) == 2 else None
    return result


def macro(values: dict[str, float | None]) -> float | None:
    """Mean of the defined values (``None`` when none is)."""
    defined = [v for v in values.values() if v is not None]
    return float(np.mean(defined)) if defined else None


def classification_metrics(logits: np.ndarray, labels: np.ndarray, diseases: tuple[str, ...]) -> dict:
    """``macro_auroc``, ``per_class_auroc``, ``f1`` (macro, logit > 0), ``per_class_f1``, ``accuracy``, ``n``."""
    aurocs = per_class_auroc(logits, labels, diseases)
    f1s: dict[str, float | None] = {}
    correct = total = 0
    for c, disease in enumerate(diseases):
        keep = _labelled(labels, c)
        y, pred = labels[keep, c].astype(int), (logits[keep, c] > 0).astype(int)
        f1s[disease] = float(f1_score(y, pred, zero_division=0)) if keep.any() else None
        correct += int((y == pred).sum())
        total += int(keep.sum())
    return {
        "macro_auroc": macro(aurocs),
        "per_class_auroc": aurocs,
        "f1": macro(f1s),
        "per_class_f1": f1s,
        "accuracy": correct / total if total else None,
        "n": int(len(labels)),
    }


def forgetting(matrix: list[list[float | None]]) -> dict[str, float | None]:
    """Forgetting and backward transfer of a task matrix (``matrix[i][j]``: AUROC on task j after task i).

    ``forgetting``: mean over earlier tasks j of (best AUROC on j before the last task − final AUROC on j);
    ``backward_transfer``: mean over earlier tasks j of (final AUROC on j − AUROC on j right after task j).
    """
    last = len(matrix) - 1
    drops, transfers = [], []
    for j in range(last):
        history = [matrix[i][j] for i in range(j, last) if matrix[i][j] is not None]
        final, learned = matrix[last][j], matrix[j][j]
        if history and final is not None:
            drops.append(max(history) - final)
        if final is not None and learned is not None:
            transfers.append(final - learned)
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {"forgetting": mean(drops), "backward_transfer": mean(transfers), "per_task_forgetting": drops}

