"""Continual learning across stages: keep what earlier stages taught when a stage supervises new diseases.

``lwf`` (learning without forgetting, Li & Hoiem 2016): at stage t, the diseases that earlier stages supervised
and stage t does not ("old" diseases) get, on each of the stage's own training images, the score of the model
training started from (at a hospital: the global model it received this round; centrally: the model at the start
of the stage) as a soft target, weighted by ``lwf_weight``. Nothing is replayed and nothing new leaves the hospital:
the targets come from the images the stage trains on and the model the hospital already holds. The term is one
more entry of each sample's own masked BCE, so per-sample DP clipping stays exact and the ε ledger unchanged.

``replay`` (rehearsal of the hospital's own data): at stage t the hospital trains on its images of every stage up to
t, each with the labels its own stage supervised, and the old diseases those labels leave out are distilled as in
``lwf``. The earlier stages' images never left the hospital and do not now: it trains on more of its own data, and
what leaves is still the adaptors. Under DP the larger set is what each step samples from, so the ledger stays
exact. It costs training time (stage t trains on all t stages' images).

In data-incremental schedules every stage supervises every disease, and in label-incremental ones supervision
accumulates, so no disease is ever "old": ``lwf`` changes nothing there, while ``replay`` adds the earlier stages'
images with their labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.scenarios import Task, supervise

#: The methods that distil old diseases from the model a stage starts from.
DISTILLING = ("lwf", "replay")


@dataclass(frozen=True)
class Targets:
    """Training targets of a stage: labels [N, C] (NaN: none; soft where distilled) and entry weights [N, C]
    (None: all 1)."""

    labels: np.ndarray
    weights: np.ndarray | None = None


def stage_examples(tasks: list[Task], stage: int, labels: np.ndarray, diseases: tuple[str, ...], method: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The training rows of ``stage`` and their labels [N, C], each row's diseases outside its stage's supervision
    masked (NaN). With ``replay``, the rows of every stage up to ``stage``, each with its own stage's labels."""
    own = tasks[:stage + 1] if method == "replay" else tasks[stage:stage + 1]
    return (np.concatenate([task.train_rows for task in own]),
            np.concatenate([supervise(labels[task.train_rows], diseases, task.supervised) for task in own]))


def old_diseases(tasks: list[Task], stage: int) -> tuple[str, ...]:
    """Diseases supervised before ``stage`` and not at it."""
    now = set(tasks[stage].supervised)
    return tuple(dict.fromkeys(d for task in tasks[:stage] for d in task.supervised if d not in now))


def lwf_targets(labels: np.ndarray, teacher_logits: np.ndarray, diseases: tuple[str, ...], old: tuple[str, ...],
                weight: float) -> Targets:
    """``labels`` with each old disease's unlabelled entries set to the teacher's probability, weighted ``weight``."""
    if not old:
        return Targets(labels)
    out = labels.astype(np.float32, copy=True)
    weights = np.ones_like(out)
    for c in (diseases.index(d) for d in old):
        free = np.isnan(out[:, c])
        out[free, c] = 1.0 / (1.0 + np.exp(-teacher_logits[free, c]))
        weights[free, c] = weight
    return Targets(out, weights)
