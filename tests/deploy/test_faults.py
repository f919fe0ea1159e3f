"""Faults in a simulation: a hospital that raises mid-train, one that raises mid-evaluate and a straggler past
``round-timeout`` each cost that hospital its round only; one that sends NaN adaptors (``--poison``) is refused every
round; with FedAdam and DP at one hospital only, the run ends, names each in ``report.json`` and learns."""

from __future__ import annotations

import time

import pytest

from deploy.simulate import run_simulation, simulation_config
from shared.config import SimulationPlan
from shared.errors import RetuneError

HOSPITALS = 4
TIMEOUT = 45.0  # the first round also loads every simulated hospital (its backbone, its cached embeddings)


def faulty(kind: str, hospital: int, round_: int):
    """A client mod: hospital ``hospital`` raises in (``train``/``evaluate``) or sleeps past the round timeout of
    (``straggle``) round ``round_``."""

    def mod(msg, context, call_next):
        if int(context.node_config.get("partition-id", -1)) == hospital and int(msg.content["config"]["round"]) == \
                round_ and msg.metadata.message_type == ("train" if kind == "straggle" else kind):
            if kind == "straggle":
                time.sleep(TIMEOUT + 10)
            else:
                raise RuntimeError(f"hospital-{hospital} crashed mid-{kind}")
        return call_next(msg, context)

    return mod


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    config = simulation_config(out, HOSPITALS, min_hospitals=2, stages=1, rounds_per_stage=3, local_epochs=2,
                               round_timeout=TIMEOUT, strategy="fedadam")
    plan = SimulationPlan(hospitals=HOSPITALS, images_per_hospital=150, image_size=64, dp_epsilon=8.0,
                          dp_hospitals=(0,), poison="nan:2")
    mods = [faulty("train", 1, 0), faulty("evaluate", 2, 1), faulty("straggle", 3, 2)]
    return run_simulation(config, plan, client_mods=mods)


def _entries(report: dict, round_: int, hospital: str) -> list[dict]:
    return [r for r in report["refused"] if r["round"] == round_ and r["hospital"] == hospital]


def test_each_fault_costs_one_hospital_one_round_and_is_named(faulty_run):
    report = faulty_run
    assert [r["clients"] for r in report["rounds"]] == [2, 3, 2]
    crashed = _entries(report, 0, "hospital-1")
    assert [(e["phase"], e["outcome"]) for e in crashed] == [("train", "declined")]
    assert crashed[0]["reason"] == "hospital-1 crashed mid-train"  # its own message, not Ray's traceback
    assert set(report["rounds"][0]["hospitals"]) == {f"hospital-{k}" for k in range(HOSPITALS)}  # it still evaluates
    evaluate = _entries(report, 1, "hospital-2")
    assert [(e["phase"], e["outcome"]) for e in evaluate] == [("train", "refused"), ("evaluate", "declined")]
    assert "hospital-2" not in report["rounds"][1]["hospitals"]
    late = _entries(report, 2, "hospital-3")
    assert late and late[0]["phase"] == "train" and f"no reply within round-timeout ({TIMEOUT:g} s)" in late[0]["reason"]
    poisoned = [e for e in report["refused"] if e["hospital"] == "hospital-2" and e["outcome"] == "refused"]
    assert [e["round"] for e in poisoned] == [0, 1, 2] and all("non-finite" in e["reason"] for e in poisoned)
    assert len(report["refused"]) == 6 + (len(late) - 1)  # the straggler may miss its evaluate too, nothing else
    assert report["poison"]["note"].startswith("testing only: hospital-2 sent nan-poisoned adaptors")
    assert set(report["privacy"]["epsilon"]) == {"hospital-0"} and 0 < report["privacy"]["epsilon"]["hospital-0"] <= 8
    assert report["final"]["macro_auroc"] > report["baselines"]["zero_shot"]["macro_auroc"]


def test_fewer_hospitals_than_min_hospitals_is_refused_up_front(tmp_path):
    with pytest.raises(RetuneError, match="min-hospitals 5 .* only 4 hospitals"):
        run_simulation(simulation_config(tmp_path, HOSPITALS, min_hospitals=5), SimulationPlan(hospitals=HOSPITALS))
    assert not (tmp_path / "hospitals").exists()
