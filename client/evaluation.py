"""What a hospital's evaluate reply may carry: metrics that are no label or membership oracle for the server.

The server may sign any adaptors it likes for an evaluate message, and the backbone is public, so it can build
adaptors that lift the score of one image it holds and tie every other test image. An exact AUROC is then
0.5 + 0.5/P if that image is a positive of the hospital's test set, 0.5 − 0.5/N if a negative, 0.5 if it is not
there; with P and N in the same reply, one evaluate message gives one patient's label away. Under the hospital's
evaluation policy (:class:`client.floor.EvaluationPolicy`, node config) a reply is built so that this learns
nothing useful, and monitoring keeps its accuracy (``docs/security.md`` has the numbers):

- **Ties are broken at random** (one order of the images per reply, from the hospital's CSPRNG): a trained model
  scores images apart, so its AUROC does not change; the attack's tied images become a random order, whose AUROC
  spreads by about sqrt((P + N + 1) / (12·P·N)), twice the 0.5/P the lifted image moves it by.
- **Gaussian noise** of ``noise / min(P, N)`` on each AUROC (the most one image's score can move it), from the same
  CSPRNG, one draw per set of images and disease in a reply: a server that places an image's score deliberately
  (the attack without ties, two evaluations compared) sees that move under noise, once per evaluation it is granted.
- **Small counts withheld, counts coarsened**: a disease with fewer than ``min_count`` positives or negatives in a
  test part is left out; positive, negative and image counts are rounded to ``count_step``.
- **One evaluation per (run, stage, round)** of the run's schedule (:func:`client.guard.round_mod` refuses a round
  past stages × rounds-per-stage): asked again with the same adaptors (a retried or resumed round), the hospital
  answers with the reply it released, no new draw; with other adaptors it refuses. Every release is kept
  in ``evaluations.jsonl`` beside the audit log, with its values.
- **At most ``max_releases`` evaluations ever**, across all runs: a server cannot average the noise away by
  asking under new run identities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import RecordDict

from client.audit import held_records
from client.dp_random import SecureRandom
from client.floor import EvaluationPolicy
from shared.errors import RetuneError

#: The hospital's record of released evaluations (beside its audit log).
RELEASES = "evaluations.jsonl"
#: Public reasons of an evaluate message the hospital does not answer (the detail stays in its audit log).
EVALUATION_DECLINED = "declined: this hospital does not release an evaluation for this message"


class EvaluationRefused(RetuneError):
    """An evaluation the policy does not release (declined, a second one for a position, the releases used up)."""


def coarse(count: int, step: int) -> int:
    """``count`` rounded to a multiple of ``step`` (at least ``step``)."""
    return max(step, step * int(round(count / step)))


def auroc_random_ties(labels: np.ndarray, scores: np.ndarray, tiebreak: np.ndarray) -> float:
    """AUROC (Mann-Whitney U over P positives and N negatives, both present) with tied scores ordered by
    ``tiebreak`` (one random key per image): equal scores count 0 or 1 instead of 0.5 each."""
    order = np.lexsort((tiebreak, scores))
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    positive = labels == 1
    p = int(positive.sum())
    n = len(labels) - p
    return float((ranks[positive].sum() - p * (p + 1) / 2) / (p * n))


def released_metrics(logits: np.ndarray, labels: np.ndarray, parts: dict[str, np.ndarray],
                     diseases: tuple[str, ...], policy: EvaluationPolicy, rng: SecureRandom) -> dict[str, float]:
    """Per test part (``{part: rows}``) and disease, ``auroc/<part>/<disease>`` with ``pos``/``neg`` counts, as the
    policy releases them; ``num-examples`` is the coarsened size of the part ``all``. One random order of the images
    breaks every tie of the release, and parts over the same images get the same value (in class, label and joint
    schedules every stage tests on every image: independent draws could be averaged to undo them)."""
    metrics: dict[str, float] = {"num-examples": coarse(len(parts["all"]), policy.count_step)}
    tiebreak = rng.uniform(len(logits))
    drawn: dict[tuple[bytes, int], float] = {}  # parts over the same images: one value, not independent draws
    for part, rows in parts.items():
        for c, disease in enumerate(diseases):
            y = labels[rows, c]
            keep = ~np.isnan(y)
            positives, negatives = int(np.sum(y[keep] == 1)), int(np.sum(y[keep] == 0))
            if min(positives, negatives) < policy.min_count:
                continue
            key = (np.sort(rows).tobytes(), c)
            if key not in drawn:
                value = auroc_random_ties(y[keep], logits[rows, c][keep], tiebreak[rows][keep])
                value += float(rng.normal(1)[0]) * policy.noise / min(positives, negatives)
                drawn[key] = float(np.clip(value, 0.0, 1.0))
            metrics[f"auroc/{part}/{disease}"] = drawn[key]
            metrics[f"pos/{part}/{disease}"] = coarse(positives, policy.count_step)
            metrics[f"neg/{part}/{disease}"] = coarse(negatives, policy.count_step)
    return metrics


class EvaluationRecord:
    """The evaluations a hospital released (``evaluations.jsonl`` beside its audit log, held exclusively from the
    look-up to the append, so two runs at once cannot both pass the limit): one per (run, stage, round), at most
    ``policy.max_releases`` ever."""

    def __init__(self, node_config: Mapping[str, Any], state: RecordDict, policy: EvaluationPolicy) -> None:
        self.node_config, self.state, self.policy = node_config, state, policy

    def answer(self, run: str, stage: int, round_: int, digest: str, compute: Callable[[], dict[str, float]]
               ) -> dict[str, float]:
        """The metrics to release for this position and adaptors: the ones released before for it, or
        ``compute()`` recorded as a new release; :class:`EvaluationRefused` when the policy does not allow it."""
        if self.policy.mode == "none":
            raise EvaluationRefused("this hospital's evaluation policy is 'none'")
        with held_records(self.node_config, RELEASES, self.state) as entries:
            for entry in entries:
                if (entry["run"], entry["stage"], entry["round"]) == (run, stage, round_):
                    if entry["digest"] == digest:
                        return entry["metrics"]
                    raise EvaluationRefused(f"an evaluation of stage {stage + 1} round {round_ + 1} of this run "
                                            "was released for other adaptors")
            if len(entries) >= self.policy.max_releases:
                raise EvaluationRefused(f"{len(entries)} evaluations released, this hospital's eval-max-releases")
            metrics = compute()
            entries.append({"run": run, "stage": stage, "round": round_, "digest": digest, "metrics": metrics})
            return metrics
