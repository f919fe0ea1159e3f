"""Incremental scenarios: how training data and supervision arrive as a sequence of tasks.

- ``joint``: one task with everything (the upper bound).
- ``class``: task t brings the images positive for its disease(s) (plus a share of images positive for none),
  and supervises those diseases only.
- ``label``: disjoint chunks; task t supervises the diseases of tasks 1..t (supervision accumulates).
- ``data``: disjoint chunks of the training and test data, every disease supervised.

By default class/label tasks bring one disease each; with fewer tasks the diseases are grouped in order.

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


def disease_groups(diseases: tuple[str, ...], n_tasks: int) -> list[tuple[str, ...]]:
    """Split the diseases into ``n_tasks`` consecutive, non-empty groups (class/label-incremental tasks)."""
    if not 1 <= n_tasks <= len(diseases):
        raise RetuneError(f"{n_tasks} tasks cannot each bring a disease: choose 1 to {len(diseases)}")
    return [tuple(group) for group in np.array_split(np.array(diseases, dtype=object), n_tasks)]


def make_tasks(scenario: Scenario, train_labels: np.ndarray, n_test: int, diseases: tuple[str, ...],
               n_tasks: int | None = None, seed: int = 0) -> list[Task]:
    """Split the training rows (and, for ``data``, the test rows) into the scenario's tasks.

    ``n_tasks`` defaults to 5 data chunks, or one task per disease for ``class`` and ``label``.
    """
    rng = np.random.default_rng(seed)
    n_train = len(train_labels)
    all_test = np.arange(n_test)
    if scenario == "joint":
        return [Task("joint", np.arange(n_train), diseases, all_test, diseases)]
    if scenario == "data":
        n_tasks = n_tasks or 5
        if not 1 <= n_tasks <= min(n_train, n_test):
            raise RetuneError(f"{n_tasks} data chunks need at least as many train and test images")
        train_parts = np.array_split(rng.permutation(n_train), n_tasks)
        test_parts = np.array_split(rng.permutation(n_test), n_tasks)
        return [Task(f"chunk {t + 1}", np.sort(tr), diseases, np.sort(te), diseases)
                for t, (tr, te) in enumerate(zip(train_parts, test_parts))]
    if scenario not in SCENARIOS:
        raise RetuneError(f"unknown scenario {scenario!r}: choose one of {', '.join(SCENARIOS)}")
    groups = disease_groups(diseases, n_tasks or len(diseases))
    names = ["+" + "+".join(group) for group in groups]
    if scenario == "label":
        parts = np.array_split(rng.permutation(n_train), len(groups))
        seen = [tuple(d for g in groups[:t + 1] for d in g) for t in range(len(groups))]
        return [Task(names[t], np.sort(parts[t]), seen[t], all_test, groups[t]) for t in range(len(groups))]
    group_of = {d: t for t, group in enumerate(groups) for d in group}
    owner = np.full(n_train, -1)
    for row in range(n_train):
        positives = np.flatnonzero(train_labels[row] == 1)
        if len(positives):
            owner[row] = group_of[diseases[rng.choice(positives)]]
    negatives = rng.permutation(np.flatnonzero(owner == -1))
    for t, part in enumerate(np.array_split(negatives, len(groups))):
        owner[part] = t
    return [Task(names[t], np.flatnonzero(owner == t), groups[t], all_test, groups[t]) for t in range(len(groups))]
