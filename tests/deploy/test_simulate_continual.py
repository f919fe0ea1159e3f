"""Class-incremental federation without and with the default continual method (replay, with LwF): a hospital that
labels none of a stage's diseases declines with a fixed public reason (and does not stop the run), unless the
method gives it old diseases to keep; the centralized baseline uses the same option; the report says which ran; a DP
hospital's ledger is charged for sampling from every stage's images that replay trains on."""

import json

import pytest
from rich.console import Console

from client.site import load_site, site_settings
from deploy.sim_data import phantom_labels
from deploy.simulate import run_simulation, simulation_config, trainable_hospitals
from shared.config import SimulationPlan
from shared.continual import stage_examples

HOSPITALS, STAGES = 3, 5
PHANTOM_LABELS = [phantom_labels(k) for k in range(HOSPITALS)]


def _run(tmp_path, continual: str) -> dict:
    config = simulation_config(tmp_path / continual, HOSPITALS, scenario="class", stages=STAGES, rounds_per_stage=1,
                               local_epochs=2, continual=continual,
                               min_hospitals=trainable_hospitals(PHANTOM_LABELS, "class", STAGES))
    plan = SimulationPlan(hospitals=HOSPITALS, images_per_hospital=150, image_size=64)
    return run_simulation(config, plan, Console(quiet=True))


def test_replay_lets_a_hospital_keep_old_diseases_where_it_labels_none_of_the_new_one(tmp_path):
    assert trainable_hospitals(PHANTOM_LABELS, "class", STAGES) == 2  # hospital-2 does not label Consolidation
    plain, lwf, kept = _run(tmp_path, "none"), _run(tmp_path, "lwf"), _run(tmp_path, "auto")
    declined = [(r["hospital"], r["stage"]) for r in plain["refused"]]
    assert declined == [("hospital-2", 2)]
    assert plain["refused"][0]["reason"] == "declined: nothing labelled to train on at this stage"
    assert lwf["refused"] == []  # it distils Atelectasis and Cardiomegaly on its own stage-3 images
    assert kept["refused"] == []  # it trains on its stage 1-2 images too
    assert plain["continual"] == {"option": "none", "method": "none"}
    assert kept["continual"] == {"option": "auto", "method": "replay", "lwf_weight": 2.0}
    centralized = [run["baselines"]["centralized"] for run in (plain, lwf, kept)]
    assert centralized[0] != centralized[1] != centralized[2] != centralized[0]  # the same option, centrally
    assert lwf["continual"] == {"option": "lwf", "method": "lwf", "lwf_weight": 2.0}
    assert plain["final"] != lwf["final"] != kept["final"] != plain["final"]  # each method's training ran


def test_a_dp_hospital_under_replay_is_charged_for_sampling_from_every_stage_it_trains_on(tmp_path):
    config = simulation_config(tmp_path / "dp", 2, scenario="class", stages=2, rounds_per_stage=1, local_epochs=1,
                               batch_size=16, continual="replay")
    plan = SimulationPlan(hospitals=2, images_per_hospital=150, image_size=64, dp_epsilon=8.0, dp_hospitals=(1,))
    report = run_simulation(config, plan, Console(quiet=True))
    assert report["refused"] == [] and 0 < report["privacy"]["epsilon"]["hospital-1"] <= 8.0
    site = load_site(config, site_settings(config, {"partition-id": 1}))
    charges = json.loads((tmp_path / "dp" / "hospitals" / "hospital-1" / "privacy-ledger.json").read_text())["entries"]
    entries = [e for e in charges if e["sample_rate"] < 1]  # the DP-SGD steps (each round also charges its count)
    assert [e["stage"] for e in entries] == [0, 1]
    assert [(e["stage"], e["sample_rate"], e["steps"]) for e in charges if e not in entries] == [(0, 1.0, 1), (1, 1.0, 1)]
    for entry in entries:  # each step sampled from the stage's images and every earlier stage's
        rows, _ = stage_examples(site.tasks, entry["stage"], site.train.labels, site.diseases, "replay")
        assert entry["sample_rate"] == pytest.approx(16 / len(rows))
        assert entry["stage"] == 0 or entry["sample_rate"] < 16 / len(site.tasks[entry["stage"]].train_rows)
