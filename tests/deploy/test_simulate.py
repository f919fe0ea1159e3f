"""End to end: 3 phantom hospitals, tiny backbone, 2 stages × 2 rounds through Flower's simulation engine."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from safetensors.numpy import load_file

from deploy.simulate import run_simulation, simulation_config
from server.federation import initial_model
from server.state import STATE
from shared.config import SimulationPlan
from shared.wire import payload_bytes, to_record

HOSPITALS, STAGES, ROUNDS = 3, 2, 2
PLAN = SimulationPlan(hospitals=HOSPITALS, images_per_hospital=300, image_size=128)
CLI_ARGS = ["--hospitals", str(HOSPITALS), "--stages", str(STAGES), "--rounds-per-stage", str(ROUNDS),
            "--local-epochs", "3", "--images-per-hospital", str(PLAN.images_per_hospital),
            "--image-size", str(PLAN.image_size)]


def _config(out: Path):
    return simulation_config(out, HOSPITALS, stages=STAGES, rounds_per_stage=ROUNDS, local_epochs=3)


def _recording_mod(log_path: str):
    """A client mod that writes down the structure of every reply a hospital sends."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        entry = {"type": msg.metadata.message_type, "records": {}}
        for name, record in reply.content.items():
            if isinstance(record, ArrayRecord):
                entry["records"][name] = {"kind": "arrays", "arrays": {
                    k: [list(a.shape), a.dtype] for k, a in record.items()}}
            elif isinstance(record, MetricRecord):
                entry["records"][name] = {"kind": "metrics", "types": sorted({type(v).__name__ for v in record.values()})}
            elif isinstance(record, ConfigRecord):
                entry["records"][name] = {"kind": "config", "values": dict(record)}
            else:
                entry["records"][name] = {"kind": type(record).__name__}
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        return reply

    return mod


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    log = out / "replies.jsonl"
    report = run_simulation(_config(out), PLAN, client_mods=[_recording_mod(str(log))])
    return out, report, [json.loads(line) for line in log.read_text().splitlines()]


def test_federation_learns_and_matches_centralized(finished):
    out, report, _ = finished
    final = report["final"]["macro_auroc"]
    assert len(report["rounds"]) == STAGES * ROUNDS
    assert final > report["baselines"]["zero_shot"]["macro_auroc"] + 0.03
    assert abs(final - report["baselines"]["centralized"]["macro_auroc"]) < 0.05
    matrix = report["stages"]["auroc_matrix"]
    assert len(matrix) == STAGES and all(len(row) == STAGES for row in matrix)
    last = {r["stage"]: r for r in report["rounds"]}  # after stage i: its last round's AUROC on stage j <= i
    assert matrix == [[last[0]["stage_auroc"][0], None], last[1]["stage_auroc"][:2]]
    assert all(0 < v < 1 for v in (matrix[0][0], matrix[1][0], matrix[1][1]))
    assert report["stages"]["forgetting"] == pytest.approx(matrix[0][0] - matrix[1][0])  # two stages, by hand
    assert report["stages"]["backward_transfer"] == pytest.approx(matrix[1][0] - matrix[0][0])
    for key in ("config", "rounds", "stages", "final", "baselines"):
        assert key in report
    for record in report["rounds"]:
        assert {"stage", "round", "macro_auroc", "per_class_auroc", "bytes_up", "bytes_down", "wall_s",
                "clients"} <= set(record)
        assert record["clients"] == HOSPITALS
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6 and "http" not in page.replace("http-equiv", "")


def _embed_dim(report: dict) -> int:
    return json.loads((Path(report["checkpoint"]) / "adaptors.json").read_text())["embed_dim"]


def test_bytes_up_per_hospital_is_the_adaptor_payload(finished):
    out, report, _ = finished
    config = _config(out)
    payload = payload_bytes(to_record(initial_model(config, _embed_dim(report)), config.wire_dtype))
    assert config.wire_dtype == "float16"
    for k, record in enumerate(report["rounds"]):
        assert record["bytes_up_per_hospital"] == {f"hospital-{k}": payload for k in range(HOSPITALS)}
        assert record["bytes_up"] == HOSPITALS * payload
        # train and evaluate messages carry the adaptors; after round 1 a train message carries only their digest
        assert record["bytes_down"] == (2 if k == 0 else 1) * HOSPITALS * payload


def test_hospitals_send_only_adaptor_arrays_and_scalars(finished):
    out, report, replies = finished
    model = initial_model(_config(out), _embed_dim(report))
    sidecar = json.loads((Path(report["checkpoint"]) / "adaptors.json").read_text())
    spec = {k: [list(t.shape), "float16"] for k, t in model.state_dict().items()}  # the wire dtype
    assert len(replies) == 2 * STAGES * ROUNDS * HOSPITALS
    for entry in replies:
        records = entry["records"]
        if entry["type"] == "train":
            assert set(records) == {"arrays", "metrics", "site"}
            assert records["arrays"]["arrays"] == spec
        else:
            assert set(records) == {"metrics", "site"}
        assert records["metrics"]["kind"] == "metrics" and set(records["metrics"]["types"]) <= {"int", "float"}
        site = records["site"]["values"]
        assert set(site) == {"name", "backbone"} and re.fullmatch(r"hospital-\d", site["name"])
        assert site["backbone"] == sidecar["backbone"]["identity"]


def test_checkpoint_is_usable_by_evaluate_and_predict(finished, tmp_path):
    from typer.testing import CliRunner

    from deploy.cli import app

    out, report, _ = finished
    manifest = out / "hospitals" / "phantoms" / "hospital-0" / "manifest.csv"  # the phantom hospital's own export
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--checkpoint", report["checkpoint"], "--data", str(manifest),
                                 "--cache", str(out / "cache"), "--public-key", str(out / "keys" / "consortium.pub")])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout[result.stdout.index("{"):])
    assert metrics["macro_auroc"] > 0.5
    # the trained adaptors were loaded: identity adaptors (a fresh model) score exactly like the zero-shot baseline
    assert abs(metrics["macro_auroc"] - metrics["zero_shot"]["macro_auroc"]) > 1e-4
    image = next((out / "hospitals" / "phantoms" / "hospital-0" / "images").glob("*.png"))
    result = runner.invoke(app, ["predict", "--checkpoint", report["checkpoint"], "--json", str(image),
                                 "--cache", str(tmp_path)])
    assert result.exit_code == 0, result.output
    probabilities = json.loads(result.stdout[result.stdout.index("{"):])[str(image)]
    assert set(probabilities) == {"Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"}
    assert all(0 <= p <= 1 for p in probabilities.values())
    assert _max_gap_to_zero_shot(Path(report["checkpoint"]), image, tmp_path, probabilities) > 1e-4


def _max_gap_to_zero_shot(checkpoint: Path, image: Path, cache: Path, probabilities: dict[str, float]) -> float:
    """Largest difference between ``probabilities`` and what identity adaptors (no checkpoint) would give."""
    import torch

    from client.local_data import prompt_embeddings
    from shared.backbone import load_backbone
    from shared.cache import EmbeddingCache
    from shared.data.problems import BadFiles
    from shared.model import zero_shot_logits
    from shared.prompts import PromptBank

    sidecar = json.loads((checkpoint / "adaptors.json").read_text())
    store = EmbeddingCache(cache, load_backbone(sidecar["backbone"]["spec"], device="cpu"))
    embeddings, _ = store.images([str(image)], BadFiles("fail"), show_progress=False)
    bank = PromptBank.from_dict(sidecar["prompts"])
    prompts = prompt_embeddings(store, bank)
    zero = torch.sigmoid(sidecar["adaptor"]["logit_scale"] * zero_shot_logits(
        torch.as_tensor(embeddings), prompts.embeddings, prompts.averaging))[0]
    return max(abs(probabilities[d] - float(z)) for d, z in zip(bank.diseases, zero))


def _retune(*args: str) -> list[str]:
    return [sys.executable, "-c", "from deploy.cli import main; main()", *args]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_simulation_resumes_to_the_same_adaptors(finished, tmp_path, sig):
    """Kill the whole simulation after a completed round (SIGKILL), or press Ctrl-C (SIGINT to the process group:
    it stops within seconds once the round in progress is committed and says how to resume); run it again, and
    reach the uninterrupted result."""
    reference, _, _ = finished
    out = tmp_path / "resumed"
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "COLUMNS": "300"}
    log = tmp_path / "stderr.txt"
    proc = subprocess.Popen(_retune("simulate", "--out", str(out), *CLI_ARGS), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            state = out / STATE
            if state.exists() and json.loads(state.read_text())["server_round"] >= 1:
                break
            assert proc.poll() is None, "the simulation ended before it could be interrupted"
            time.sleep(0.2)
        else:
            pytest.fail("no round completed within 300 s")
        os.killpg(proc.pid, sig)
        signalled = time.monotonic()
        proc.wait(timeout=120)
        waited = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    interrupted = json.loads((out / STATE).read_text())["server_round"]
    assert 1 <= interrupted < STAGES * ROUNDS
    if sig == signal.SIGKILL:  # and the embedding cache is lost between rounds: rebuilt, same result
        shutil.rmtree(out / "cache")
    if sig == signal.SIGINT:
        stderr = log.read_text()
        assert proc.returncode == 130 and waited < 60, (proc.returncode, waited, stderr[-2000:])
        assert "run the same command again to resume" in stderr and "Traceback" not in stderr
        assert f"interrupted after stage {(interrupted - 1) // ROUNDS + 1} round {(interrupted - 1) % ROUNDS + 1}" \
            in stderr
    subprocess.run(_retune("simulate", "--out", str(out), *CLI_ARGS), env=env, check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = json.loads((out / STATE).read_text())
    assert state["server_round"] == STAGES * ROUNDS
    assert len(list((out / "cache").glob("*/images/shard-*.safetensors"))) >= 1  # re-embedded (after SIGKILL)
    expected = json.loads((reference / STATE).read_text())
    resumed_weights = load_file(out / state["arrays"])
    for key, value in load_file(reference / expected["arrays"]).items():
        np.testing.assert_allclose(resumed_weights[key], value, rtol=0, atol=1e-6)
    # scored exactly, the same adaptors give the same figure; what each hospital released is noised per release
    # (client/evaluation.py: about 0.01 on these small test sets), so two runs' releases differ by that noise
    resumed, first = json.loads((out / "report.json").read_text()), json.loads((reference / "report.json").read_text())
    assert resumed["final"]["exact_macro_auroc"] == pytest.approx(first["final"]["exact_macro_auroc"], abs=1e-4)
    assert [r["macro_auroc"] for r in state["history"]] == pytest.approx(
        [r["macro_auroc"] for r in expected["history"]], abs=0.05)


def test_every_hospital_audited_what_it_sent_and_the_checkpoint_is_signed(finished, tmp_path):
    from client.audit import verify_log
    from shared.errors import RetuneError
    from shared.signing import verify_checkpoint

    out, report, _ = finished
    for k in range(HOSPITALS):
        audit = verify_log(out / "hospitals" / f"hospital-{k}" / "audit.jsonl")
        assert audit.ok and audit.entries == 2 * STAGES * ROUNDS  # one train and one evaluate reply per round
    verify_checkpoint(Path(report["checkpoint"]), out / "keys" / "consortium.pub")
    other = tmp_path / "other"
    from shared.signing import generate_keys

    generate_keys(other)
    with pytest.raises(RetuneError):
        verify_checkpoint(Path(report["checkpoint"]), other / "consortium.pub")


def test_a_tampered_simulation_folder_is_refused_before_anything_runs(tmp_path):
    """Zero the global adaptors and claim AUROC 0.999 in a finished round's run folder, then run the same
    simulation again: it stops at once, before a single hospital is prepared or anything is signed."""
    from deploy.simulate import KEYS_DIR
    from server.state import RunState
    from shared.errors import RetuneError
    from shared.signing import generate_keys, load_private_key

    out = tmp_path / "sim"
    config = _config(out)
    key = load_private_key(generate_keys(out / KEYS_DIR)[0])
    model = initial_model(config, 256)
    state = RunState.open(config, to_record(model), key)
    state.commit(to_record(model), {}, {"macro_auroc": 0.7}, key=key)
    saved = json.loads((out / STATE).read_text())
    saved["history"][-1]["macro_auroc"] = 0.999
    (out / STATE).write_text(json.dumps(saved))
    with pytest.raises(RetuneError, match="cannot be resumed"):
        run_simulation(config, PLAN)
    assert not (out / "hospitals").exists() and not (out / "checkpoint").exists()
