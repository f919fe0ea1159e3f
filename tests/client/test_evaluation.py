"""What a hospital's evaluate reply carries (:mod:`client.evaluation`): ties broken at random, noise of the stated
size, small counts withheld, counts coarsened, one release per (run, stage, round), at most the floor's number ever;
through the installed ClientApp of a phantom hospital too."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import RecordDict

from client.dp_random import SecureRandom
from client.evaluation import (EVALUATION_DECLINED, EvaluationRecord, EvaluationRefused, auroc_random_ties, coarse,
                               released_metrics)
from client.floor import EvaluationPolicy
from deploy.redteam.bench import Bench
from shared.metrics import auroc
from shared.wire import METRICS


def test_ties_are_broken_at_random_and_distinct_scores_keep_their_auroc():
    rng = np.random.default_rng(0)
    labels = (rng.random(200) < 0.3).astype(float)
    scores = rng.normal(size=200) + labels
    assert auroc_random_ties(labels, scores, SecureRandom().uniform(200)) == pytest.approx(auroc(labels, scores),
                                                                                           abs=1e-12)
    # the oracle's scores: one image lifted, every other one tied; exactly 0.5 + 0.5/P with ties counting half
    lifted = np.zeros(200)
    lifted[np.flatnonzero(labels)[0]] = 1.0
    p = int(labels.sum())
    assert auroc(labels, lifted) == pytest.approx(0.5 + 0.5 / p)
    draws = np.array([auroc_random_ties(labels, lifted, SecureRandom().uniform(200)) for _ in range(300)])
    spread = np.sqrt((p + (200 - p) + 1) / (12 * p * (200 - p)))  # the AUROC of a random order
    assert draws.std() == pytest.approx(spread, rel=0.2) and draws.std() > 2 * (0.5 / p)
    assert len(set(draws.round(12))) > 100


def test_released_metrics_are_noised_withheld_and_coarsened():
    rng = np.random.default_rng(1)
    labels = np.stack([(rng.random(120) < 0.25), (rng.random(120) < 0.03)], axis=1).astype(float)
    logits = rng.normal(size=(120, 2)) + 2 * labels
    parts = {"s0": np.arange(60), "all": np.arange(120)}
    policy = EvaluationPolicy(noise=0.15, min_count=5, count_step=5)
    released = [released_metrics(logits, labels, parts, ("A", "B"), policy, SecureRandom()) for _ in range(400)]
    first = released[0]
    assert first["num-examples"] == 120 and all(v % 5 == 0 for k, v in first.items() if k.startswith(("pos", "neg")))
    assert not any(k.endswith("/B") for k in first)  # 3 % of 120: fewer than 5 positives, withheld
    p, n = int(labels[:, 0].sum()), int((labels[:, 0] == 0).sum())
    values = np.array([r["auroc/all/A"] for r in released])
    exact = auroc(labels[:, 0], logits[:, 0])
    assert values.mean() == pytest.approx(exact, abs=0.01)
    assert values.std() == pytest.approx(0.15 / min(p, n), rel=0.15)
    assert first["pos/all/A"] == coarse(p, 5) and first["neg/all/A"] == coarse(n, 5)
    # one order breaks every tie of a release: parts over the same images give the same AUROC up to the noise
    same = {"s0": np.arange(120), "all": np.arange(120)}
    tied = np.zeros((120, 2))
    tied[np.flatnonzero(labels[:, 0])[0], 0] = 1.0  # the oracle's scores
    quiet = EvaluationPolicy(noise=0.0, min_count=2, count_step=1)
    oracle = []
    for _ in range(200):
        release = released_metrics(tied, labels, same, ("A", "B"), quiet, SecureRandom())
        assert release["auroc/s0/A"] == release["auroc/all/A"]
        oracle.append(release["auroc/all/A"])
    # without noise, the oracle's exact 0.5 + 0.5/P becomes the AUROC of a random order: it spreads by
    # sqrt((P + N + 1) / (12 P N)), about twice the 0.5/P the lifted image moves it by
    assert np.mean(oracle) == pytest.approx(0.5 + 0.5 / p, abs=0.02)
    assert np.std(oracle) == pytest.approx(np.sqrt((p + n + 1) / (12 * p * n)), rel=0.25)
    # ... and the same noise too (in class, label and joint schedules every stage tests every image): averaging
    # the parts of one reply would otherwise shrink the noise by the number of stages
    for _ in range(20):
        release = released_metrics(logits, labels, {"s0": np.arange(120), "s1": np.arange(120)[::-1],
                                                    "all": np.arange(120)}, ("A",), policy, SecureRandom())
        assert release["auroc/s0/A"] == release["auroc/s1/A"] == release["auroc/all/A"]


def test_one_release_per_position_and_at_most_the_floors_number():
    calls = []

    def compute():
        calls.append(1)
        return {"num-examples": 10, "auroc/all/A": float(len(calls))}

    record = EvaluationRecord({}, RecordDict(), EvaluationPolicy(max_releases=2))
    assert record.answer("run", 0, 0, "digest-a", compute) == {"num-examples": 10, "auroc/all/A": 1.0}
    assert record.answer("run", 0, 0, "digest-a", compute)["auroc/all/A"] == 1.0 and len(calls) == 1  # the same
    with pytest.raises(EvaluationRefused, match="other adaptors"):
        record.answer("run", 0, 0, "digest-b", compute)
    record.answer("run", 0, 1, "digest-b", compute)
    with pytest.raises(EvaluationRefused, match="eval-max-releases"):
        record.answer("another-run", 0, 0, "digest-a", compute)
    with pytest.raises(EvaluationRefused, match="'none'"):
        EvaluationRecord({}, RecordDict(), EvaluationPolicy(mode="none")).answer("run", 0, 0, "d", compute)
    assert len(calls) == 2


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Bench:
    return Bench.build(tmp_path_factory.mktemp("evaluation"), "retune-tiny-random", hospitals=1, images=120, size=32)


def test_the_installed_hospital_answers_a_position_once_and_keeps_what_it_released(bench):
    import json

    hospital = bench.reset()[0]
    run = {"scenario": "joint", "stages": 1, "wire-dtype": "float32"}
    hospital.join(5, run)
    arrays = bench.initial(run, 128)
    first = bench.send(hospital, "evaluate", arrays, run, 5)
    again = bench.send(hospital, "evaluate", arrays, run, 5)  # a retried round: the same reply, no new draw
    assert not first.has_error() and dict(first.content[METRICS]) == dict(again.content[METRICS])
    from flwr.app import Array, ArrayRecord

    other = ArrayRecord({k: Array(a.numpy() * 1.01) for k, a in arrays.items()})
    refused = bench.send(hospital, "evaluate", other, run, 5)
    assert refused.has_error() and refused.error.reason == EVALUATION_DECLINED
    kept = [json.loads(line) for line in (hospital.folder / "state" / "evaluations.jsonl").read_text().splitlines()]
    assert len(kept) == 1 and kept[0]["metrics"] == dict(first.content[METRICS])
    audit = [json.loads(line) for line in (hospital.folder / "state" / "audit.jsonl").read_text().splitlines()]
    assert audit[0]["metric_values"] == dict(first.content[METRICS])  # the log says what left, values included


def test_a_hospital_whose_policy_is_none_releases_nothing_and_reads_nothing(bench):
    hospital = bench.reset({"evaluation": "none", "manifest": str(bench.root / "not-read.csv")})[0]
    run = {"wire-dtype": "float32"}
    hospital.join(6, run)
    reply = bench.send(hospital, "evaluate", bench.initial(run, 128), run, 6)
    assert reply.has_error() and reply.error.reason == EVALUATION_DECLINED
