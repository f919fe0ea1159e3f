"""Class-incremental federation without and with the default continual method (replay, with LwF): a hospital that
labels none of a stage's diseases declines with a fixed public reason (and does not stop the run), unless the
method gives it old diseases to keep; the centralized baseline uses the same option; the report says which ran."""

from rich.console import Console

from deploy.simulate import run_simulation, simulation_config, trainable_hospitals
from shared.config import SimulationPlan

HOSPITALS, STAGES = 3, 5


def _run(tmp_path, continual: str) -> dict:
    config = simulation_config(tmp_path / continual, HOSPITALS, scenario="class", stages=STAGES, rounds_per_stage=1,
                               local_epochs=2, continual=continual,
                               min_hospitals=trainable_hospitals(HOSPITALS, "class", STAGES))
    plan = SimulationPlan(hospitals=HOSPITALS, images_per_hospital=150, image_size=64)
    return run_simulation(config, plan, Console(quiet=True))


def test_replay_lets_a_hospital_keep_old_diseases_where_it_labels_none_of_the_new_one(tmp_path):
    assert trainable_hospitals(HOSPITALS, "class", STAGES) == 2  # hospital-2 does not label Consolidation
    plain, lwf, kept = _run(tmp_path, "none"), _run(tmp_path, "lwf"), _run(tmp_path, "auto")
    declined = [(r["hospital"], r["stage"]) for r in plain["refused"]]
    assert declined == [("hospital-2", 2)]
    assert plain["refused"][0]["reason"] == "declined: nothing labelled to train on at this stage"
    assert lwf["refused"] == []  # it distils Atelectasis and Cardiomegaly on its own stage-3 images
    assert kept["refused"] == []  # it trains on its stage 1-2 images too
    assert plain["continual"] == {"option": "none", "method": "none"}
    assert kept["continual"] == {"option": "auto", "method": "replay", "lwf_weight": 2.0}
    assert kept["baselines"]["centralized"] != plain["baselines"]["centralized"]  # the same option, centrally
    assert lwf["continual"] == {"option": "lwf", "method": "lwf", "lwf_weight": 2.0}
    assert plain["final"] != lwf["final"] != kept["final"]  # the hospitals trained on what each method gives
