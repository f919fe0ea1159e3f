"""A federation that trains LoRA in the backbone and RE-tune adaptors (``both``), with DP-SGD at one hospital:
what crosses the wire is derived from the model, the DP hospital's ε is charged to its ledger, and the checkpoint
carries the learnt LoRA matrices into ``retune predict``."""

import json
from pathlib import Path

import torch
from rich.console import Console
from typer.testing import CliRunner

from deploy.cli import app
from deploy.simulate import run_simulation, simulation_config
from server.federation import initial_model
from shared.checkpoint import load_checkpoint
from shared.config import SimulationPlan
from tests.deploy.test_simulate import _recording_mod


def test_lora_and_adaptors_federate_with_dp_at_one_hospital(tmp_path):
    config = simulation_config(tmp_path / "run", 2, stages=1, rounds_per_stage=2, local_epochs=1,
                               adaptor_kind="both", lora_rank=8)
    plan = SimulationPlan(hospitals=2, images_per_hospital=100, image_size=64, dp_epsilon=8.0, dp_hospitals=(1,))
    log = tmp_path / "replies.jsonl"
    report = run_simulation(config, plan, Console(quiet=True), client_mods=[_recording_mod(str(log))])

    model = initial_model(config, 256)
    spec = {k: [list(t.shape), "float16"] for k, t in model.state_dict().items()}
    assert sum(".lora_" in k for k in spec) == 4 and sum("_adaptor." in k for k in spec) == 8
    trains = [json.loads(line) for line in log.read_text().splitlines() if '"train"' in line]
    assert len(trains) == 4 and all(t["records"]["arrays"]["arrays"] == spec for t in trains)
    adaptors = report["adaptors"]
    assert adaptors["kind"] == "both" and adaptors["lora"]["rank"] == 8
    assert adaptors["trainable_parameters"] == sum(p.numel() for p in model.trainable())
    assert adaptors["embedding_cache"] == "text"
    for record in report["rounds"]:
        assert set(record["bytes_up_per_hospital"].values()) == {adaptors["payload_bytes"]}
    epsilon = report["privacy"]["epsilon"]
    assert set(epsilon) == {"hospital-1"} and 0 < epsilon["hospital-1"] <= 8.0
    ledger = json.loads((tmp_path / "run" / "hospitals" / "hospital-1" / "privacy-ledger.json").read_text())
    assert len(ledger["entries"]) == 4  # per round, its DP-SGD steps and its noisy example count
    assert report["final"]["macro_auroc"] is not None

    folder = Path(report["checkpoint"])
    trained, _, sidecar = load_checkpoint(folder)
    assert sidecar["adaptor_kind"] == "both" and sidecar["lora"]["rank"] == 8
    learnt = [v for k, v in trained.state_dict().items() if "lora_B" in k]
    assert learnt and all(float(v.abs().max()) > 0 for v in learnt)  # B starts at zero: the federation moved it
    image = sorted((tmp_path / "run" / "hospitals" / "phantoms" / "hospital-0").rglob("*.png"))[0]
    result = CliRunner().invoke(app, ["predict", "--checkpoint", str(folder), "--cache", str(tmp_path / "cache"),
                                      "--json", str(image)])
    assert result.exit_code == 0, result.output
    probabilities = json.loads(result.stdout[result.stdout.index("{"):])[str(image)]
    assert set(probabilities) == set(sidecar["diseases"]) and all(0 < p < 1 for p in probabilities.values())
    with torch.no_grad():
        assert not torch.equal(trained.state_dict()[next(iter(spec))], model.state_dict()[next(iter(spec))])
