"""Incremental scenarios: how training data and supervision arrive as a sequence of tasks.

- ``joint``: one task with everything (the upper bound).
- ``class``: task t brings the images positive for disease t (plus a share of images positive for none), and
  supervises disease t only.
- ``label``: disjoint chunks; task t supervises diseases 1..t (supervision accumulates).
- ``data``: ``chunks`` disjoint chunks of the training and test data, every disease supervised.

After each task the model is scored on every task's test data; that matrix gives forgetting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.config import Scenario
from shared.errors import RetuneError

SCENARIOS: tuple[str, ...] = ("joint", "class", "label", "data")


@dataclass(frozen=True)
class Task:
    """One step of a scenario.

    ``train_rows``/``test_rows`` index the training and test tables; ``supervised`` names the diseases whose
    labels train this task; ``scored`` the diseases its test AUROC averages over.
    """

    name: str
    train_rows: np.ndarray
    supervised: tuple[str, ...]
    test_rows: np.ndarray
    scored: tuple[str, ...]


def supervise(labels: np.ndarray, diseases: tuple[str, ...], supervised: tuple[str, ...]) -> np.ndarray:
    """A copy of ``labels`` with the columns of unsupervised diseases masked (NaN)."""
    out = labels.astype(np.float32, copy=True)
    out[:, [c for c, d in enumerate(diseases) if d not in supervised]] = np.nan
    return out


def make_tasks(scenario: Scenario, train_labels: np.ndarray, n_test: int, diseases: tuple[str, ...],
               chunks: int = 5, seed: int = 0) -> list[Task]:
    """Split the training rows (and, for ``data``, the test rows) into the scenario's tasks."""
    rng = np.random.default_rng(seed)
    n_train = len(train_labels)
    all_test = np.arange(n_test)
    if scenario == "joint":
        return [Task("joint", np.arange(n_train), diseases, all_test, diseases)]
    if scenario == "data":
        if not 1 <= chunks <= min(n_train, n_test):
            raise RetuneError(f"--chunks {chunks} must be between 1 and the number of train/test images")
        train_parts = np.array_split(rng.permutation(n_train), chunks)
        test_parts = np.array_split(rng.permutation(n_test), chunks)
        return [Task(f"chunk {t + 1}", np.sort(tr), diseases, np.sort(te), diseases)
                for t, (tr, te) in enumerate(zip(train_parts, test_parts))]
    if scenario == "label":
        parts = np.array_split(rng.permutation(n_train), len(diseases))
        return [Task(f"+{d}", np.sort(parts[t]), diseases[:t + 1], all_test, (d,)) for t, d in enumerate(diseases)]
    if scenario == "class":
        owner = np.full(n_train, -1)
        for row in range(n_train):
            positives = np.flatnonzero(train_labels[row] == 1)
            if len(positives):
                owner[row] = rng.choice(positives)
        negatives = rng.permutation(np.flatnonzero(owner == -1))
        for t, part in enumerate(np.array_split(negatives, len(diseases))):
            owner[part] = t
        return [Task(d, np.flatnonzero(owner == t), (d,), all_test, (d,)) for t, d in enumerate(diseases)]
    raise RetuneError(f"unknown scenario {scenario!r}: choose one of {', '.join(SCENARIOS)}")
