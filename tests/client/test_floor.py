"""The hospital's privacy floor (node config) against the run config a server sends, through the installed
ClientApp (:func:`client.app.make_client_app`) of a phantom hospital: a run asking for less is refused with the fixed
public reason before any data is read, and audited."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict

from client.audit import AuditLog
from client.floor import FLOOR_REFUSED, EvaluationPolicy, PrivacyFloor
from client.guard import PUBLIC_REASONS
from deploy.redteam.bench import Bench
from shared.config import FederationConfig
from shared.errors import RetuneError
from shared.secagg import PROTOCOL, SESSION_BYTES
from shared.wire import SECAGG


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Bench:
    return Bench.build(tmp_path_factory.mktemp("floor"), "retune-tiny-random", hospitals=1, images=40, size=32)


def test_the_floor_is_read_strictly_from_the_node_config():
    floor = PrivacyFloor.from_node_config({})
    assert floor == PrivacyFloor() and not floor.require_secure_aggregation and floor.dp is None
    assert floor.evaluation == EvaluationPolicy() and floor.secagg_max_colluders == 1
    strict = PrivacyFloor.from_node_config({"require-secure-aggregation": "true", "secagg-min-hospitals": 5,
                                            "dp-max-epsilon": "4", "eval-max-releases": 0, "evaluation": "none"})
    assert strict.require_secure_aggregation and strict.secagg_min_hospitals == 5 and strict.dp.max_epsilon == 4
    assert strict.evaluation.mode == "none" and strict.evaluation.max_releases == 0
    for bad, key in (({"require-secure-aggregation": "yes"}, "require-secure-aggregation"),
                     ({"secagg-min-hospitals": 2}, "secagg-min-hospitals"),
                     ({"secagg-max-colluders": "one"}, "secagg-max-colluders"),
                     ({"eval-noise": "lots"}, "eval-noise"), ({"evaluation": "exact"}, "evaluation"),
                     ({"dp-max-epsilon": 8, "dp-count-noise": 0}, "dp-count-noise"),
                     ({"max-lora-rank": 2.5}, "max-lora-rank")):
        with pytest.raises(RetuneError, match=key):
            PrivacyFloor.from_node_config(bad)


def test_a_run_is_below_the_floor_when_it_asks_for_less():
    floor = PrivacyFloor.from_node_config({"require-secure-aggregation": True, "adaptor-kinds": "retune,lora"})
    assert floor.problems(FederationConfig(secure_aggregation=True)) == []
    assert "require-secure-aggregation" in floor.problems(FederationConfig())[0]
    assert floor.problems(FederationConfig(secure_aggregation=True, adaptor_kind="lora", lora_rank=8)) == []
    assert any("max-lora-rank" in p for p in floor.problems(
        FederationConfig(secure_aggregation=True, adaptor_kind="lora", lora_rank=128)))
    verdicts = {row[0]: row[3] for row in floor.rows(FederationConfig())}
    assert verdicts["secure aggregation"] == "REFUSED" and verdicts["adaptor kind"] == "ok"


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_a_hospital_that_requires_secure_aggregation_refuses_a_plain_run_before_reading_its_data(bench, kind):
    hospital = bench.reset({"require-secure-aggregation": True, "manifest": str(bench.root / "not-read.csv")})[0]
    run = {"wire-dtype": "float32"}
    hospital.join(1, run)
    reply = bench.send(hospital, kind, bench.initial(run, 128), run, 1)
    assert reply.has_error() and reply.error.reason == FLOOR_REFUSED and FLOOR_REFUSED in PUBLIC_REASONS
    (entry,) = AuditLog(hospital.node_config["audit-log"]).entries()
    assert entry["event"] == "error" and "require-secure-aggregation" in entry["reason"]
    # the manifest does not exist: a refusal after reading data would have been an app failure, not this reason


def test_a_secure_run_passes_the_floor(bench):
    hospital = bench.reset({"require-secure-aggregation": True})[0]
    run = {"secure-aggregation": True}
    hospital.join(2, run)
    setup = RecordDict({SECAGG: ConfigRecord({"protocol": PROTOCOL, "session": bytes(SESSION_BYTES), "index": 1,
                                              "stage": 0, "round": 0})})
    reply = hospital.handle(bench.message(hospital, "train.secagg_setup", setup, 2))
    assert not reply.has_error() and reply.content[SECAGG]["name"] == "hospital-0"


def test_a_run_asking_for_lora_is_refused_by_a_hospital_that_trains_adaptors_only(bench):
    hospital = bench.reset({"manifest": str(Path(bench.root) / "not-read.csv")})[0]
    run = {"adaptor-kind": "lora", "wire-dtype": "float32"}
    hospital.join(3, run)
    reply = bench.send(hospital, "train", bench.initial({"wire-dtype": "float32"}, 128), run, 3)
    assert reply.has_error() and reply.error.reason == FLOOR_REFUSED
