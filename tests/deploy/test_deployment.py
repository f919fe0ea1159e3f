"""A deployed federation as real processes on 127.0.0.1, brought up by ``retune federation up``: a TLS SuperLink
with node authentication, a persistent database and process isolation, the Fleet gateway, the consortium's own
ServerApp runtime (the only holder of the signing key), and three hospitals, each a SuperNode with its own key and
its own runtime serving the installed retune-fl, on the offline default backbone. Runs are submitted with Flower's
``flwr run``.

What is shown: a run completes (2 stages × 2 rounds) with a signed checkpoint and every message that left each
hospital in its verified audit log; a run whose app package the operator did not approve fails at the server
runtime before anything is sent or signed; an app package whose ``client/`` was modified (approved by a careless
operator) is refused at every hospital before any of its code runs, and the run fails loudly; a SuperNode killed mid-round costs that round one hospital
and the restarted hospital rejoins; the SuperLink and ServerApp killed mid-run and restarted resume to the same final
adaptors as the uninterrupted run; the Control API is not reachable through the gateway; an unregistered key, a
plaintext SuperNode, one without the federation CA and a runtime without the SuperExec secret are turned away.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file

from client.audit import REFUSED, SENT, AuditLog, verify_log
from client.runtime import HospitalRuntime
from shared.task_runtime import RuntimeSettings
from deploy.launcher import BIN, CONNECTION, Layout, down, load_record, status, up
from deploy.processes import Process, free_port
from server.state import STATE
from shared.signing import verify_checkpoint
from tests.conftest import fab_of, make_app

pytestmark = pytest.mark.timeout(900)
HOSPITALS = 3
RUN = {"stages": 2, "rounds-per-stage": 2, "local-epochs": 1, "join-timeout": 120.0}


@dataclass
class Deployment:
    root: Path
    layout: Layout
    app: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "FLWR_HOME": str(self.layout.flwr_home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def submit(self, name: str, app: Path | None = None, timeout: float = 60.0, **settings: object
               ) -> tuple[subprocess.Popen, str]:
        """``flwr run APP retune --stream`` as the operator types it (run config :data:`RUN` with ``settings``,
        ``_`` for ``-``); returns the process and Flower's run id."""
        log = self.root / f"flwr-run-{name}-{time.monotonic_ns()}.log"
        values = {**RUN, "round-timeout": timeout, "run-dir": f"runs/{name}",
                  **{k.replace("_", "-"): v for k, v in settings.items()}}
        config = " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())  # TOML: "text", 1.0, true
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(BIN / "flwr"), "run", str(app or self.app), CONNECTION, "--stream",
                                     "--run-config", config], env=self.env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (found := re.search(r"Successfully started run (\d+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        return proc, found.group(1)

    def state(self, name: str) -> dict:
        path = self.layout.server / "runs" / name / STATE
        return json.loads(path.read_text()) if path.exists() else {"server_round": 0, "history": []}

    def wait_rounds(self, name: str, rounds: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.state(name)["server_round"] < rounds:
            assert time.monotonic() < deadline, f"run {name} did not reach round {rounds} in {timeout:.0f} s"
            time.sleep(0.2)

    def kill(self, service: str) -> None:
        """SIGKILL a service's whole process group."""
        os.killpg(Process(**load_record(self.root / "fed")["processes"][service]).pid, signal.SIGKILL)

    def run(self, run_id: str) -> dict:
        """Flower's record of a run (``flwr list --format json``)."""
        runs = json.loads(self.flwr("list", CONNECTION, "--format", "json").stdout)["runs"]
        return next(r for r in runs if r["run-id"] == run_id)

    def audit(self, k: int) -> list[dict]:
        return AuditLog(self.layout.hospital_files(k).audit_log).entries()


def _finish(proc: subprocess.Popen, timeout: float = 400) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"flwr run did not finish within {timeout:.0f} s")


def _leftovers(root: Path) -> list[int]:
    """Processes whose FLWR_HOME lies under the test's folder (started by the launcher, or by what it started)."""
    marker = str(root).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if any(v.startswith(b"FLWR_HOME=") and marker in v for v in (entry / "environ").read_bytes().split(b"\0")):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deployment")
    app = make_app(root / "app" / "retune-fl")
    start = time.monotonic()
    try:
        up(root / "fed", hospitals=HOSPITALS, images=90, image_size=64, app=app)
        print(f"federation up in {time.monotonic() - start:.1f} s")
        yield Deployment(root, Layout((root / "fed").resolve()), app)
    finally:
        if (root / "fed" / "federation.json").exists():
            down(root / "fed")
        for pid in _leftovers(root):
            os.kill(pid, signal.SIGKILL)
        assert not _leftovers(root), "processes of the federation outlived the test"


@pytest.fixture(scope="module")
def reference(deployment) -> dict:
    """The uninterrupted run: 2 stages × 2 rounds with every hospital."""
    start = time.monotonic()
    proc, run_id = deployment.submit("reference")
    _finish(proc)
    print(f"reference run: {time.monotonic() - start:.1f} s")
    return {**deployment.state("reference"), "run_id": run_id}


@pytest.fixture(scope="module")
def strangers(deployment, tmp_path_factory) -> dict[str, subprocess.Popen]:
    """SuperNodes that must be turned away, started early (each gives up on its own within about 20 s)."""
    from deploy.certs import make_certificates, make_hospital_keys

    root = tmp_path_factory.mktemp("strangers")
    layout, ports = deployment.layout, load_record(deployment.root / "fed")["ports"]
    stranger = make_hospital_keys(root / "stranger", "stranger")  # never registered by the operator
    other_ca = make_certificates(root / "other-ca")
    give_up = ["--isolation", "process", "--max-retries", "1", "--max-wait-time", "20"]
    attempts = {
        "unregistered": ["--root-certificates", layout.server_files().ca_cert, "--auth-supernode-private-key",
                         str(stranger.private_key)],
        "plaintext": ["--insecure"],
        "wrong-ca": ["--root-certificates", str(other_ca.ca_cert), "--auth-supernode-private-key",
                     str(stranger.private_key)],
    }
    procs = {name: subprocess.Popen([str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{ports['gateway']}",
                                     "--port", str(free_port()), *args, *give_up], env=deployment.env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, args in attempts.items()}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()


def test_hospitals_made_their_own_keys_and_the_gateway_carries_the_fleet_api_only(deployment, strangers):
    fed = status(deployment.root / "fed")
    assert all(p["running"] for p in fed["processes"].values()), fed["processes"]
    assert all(h["online"] for h in fed["hospitals"].values()) and len(fed["hospitals"]) == HOSPITALS
    for path in deployment.layout.server.rglob("*"):  # the operator's side never held a hospital private key
        assert not path.is_file() or b"OPENSSH PRIVATE KEY" not in path.read_bytes(), path
    for k in range(HOSPITALS):
        assert b"OPENSSH PRIVATE KEY" in Path(deployment.layout.hospital_files(k).auth_key).read_bytes()
    ports = load_record(deployment.root / "fed")["ports"]
    ca = deployment.layout.server_files().ca_cert
    with httpx.Client(verify=ca) as client:
        refused = client.post(f"https://127.0.0.1:{ports['gateway']}/v1/control/list-runs", content=b"")
        assert refused.status_code == 403 and "Fleet API only" in refused.text
        direct = client.post(f"https://127.0.0.1:{ports['superlink']}/v1/control/list-runs", content=b"")
        assert direct.status_code != 403  # the SuperLink itself answers: the refusal was the gateway's
    home = deployment.root / "via-gateway"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "gw"\n\n[superlink.gw]\naddress = '
                                      f'"127.0.0.1:{ports["gateway"]}"\nroot-certificates = "{ca}"\n')
    listing = subprocess.run([str(BIN / "flwr"), "list", "gw"], env={**deployment.env(), "FLWR_HOME": str(home)},
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode != 0  # a hospital-side host cannot list, submit or stop runs


def test_a_run_completes_through_flwr_run_signed_audited_and_named(deployment, reference):
    history = reference["history"]
    assert [(r["stage"], r["round"], r["clients"]) for r in history] == [(0, 0, 3), (0, 1, 3), (1, 0, 3), (1, 1, 3)]
    names = {f"hospital-{k}" for k in range(HOSPITALS)}
    assert all(set(r["bytes_up_per_hospital"]) == names and set(r["hospitals"]) == names for r in history)
    assert history[-1]["macro_auroc"] > 0.5
    checkpoint = deployment.layout.server / "runs" / "reference" / "checkpoint"
    verify_checkpoint(checkpoint, deployment.layout.hospital_files(0).consortium_key)
    sidecar = json.loads((checkpoint / "adaptors.json").read_text())
    assert sidecar["backbone"]["identity"] == reference["backbone"]
    evaluated = subprocess.run([str(BIN / "retune"), "evaluate", "--checkpoint", str(checkpoint), "--data",
                                deployment.layout.hospital_files(0).manifest, "--cache",
                                deployment.layout.hospital_files(0).cache, "--public-key",
                                deployment.layout.hospital_files(0).consortium_key],
                               capture_output=True, text=True, timeout=300,
                               env={**os.environ, "RETUNE_CACHE": deployment.layout.hospital_files(0).cache})
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]  # the recorded identity is the real backbone's
    run_id = int(reference["run_id"])
    assert deployment.run(reference["run_id"])["status"] == "finished:completed"
    for k in range(HOSPITALS):
        assert verify_log(deployment.layout.hospital_files(k).audit_log).ok
        sent = [e for e in deployment.audit(k) if e["run_id"] == run_id and e["event"] == SENT]
        rounds = {(0, 0), (0, 1), (1, 0), (1, 1)}
        for kind in ("train", "evaluate"):
            assert {(e["stage"], e["round"]) for e in sent if e["message_type"] == kind} == rounds
        assert len(sent) == 8, "every message that left the hospital is in its log, once"
        assert all(set(e["records"]) == ({"arrays", "metrics", "site"} if e["message_type"] == "train"
                                         else {"metrics", "site"}) for e in sent)
        assert not any(deployment.root.glob(f"fed/homes/*-{k}/apps")), "an app package was unpacked at a hospital"


def test_a_secure_aggregation_run_with_signed_key_announcements(deployment, reference):
    """Secure aggregation over real processes: each hospital signs its round keys with its SuperNode key and checks
    its peers' against the roster the operator handed out; the server sees only masked vectors and their sum."""
    proc, run_id = deployment.submit("secure", stages=1, rounds_per_stage=1, secure_aggregation=True)
    _finish(proc)
    assert deployment.run(run_id)["status"] == "finished:completed"
    (record,) = deployment.state("secure")["history"]
    assert record["clients"] == 3 and record["declined"] == [] and record["refused"] == []
    for k in range(HOSPITALS):
        sent = [e for e in deployment.audit(k) if e["run_id"] == int(run_id) and e["event"] == SENT]
        assert {e["message_type"] for e in sent} == {"train.secagg_setup", "train.secagg_share_keys",
                                                     "train.secagg_masked", "train.secagg_consistency",
                                                     "train.secagg_unmask", "evaluate"}
        assert all("arrays" not in e["records"] for e in sent)  # no plain update left any hospital


def test_a_package_the_operator_did_not_approve_fails_at_the_server_before_anything_is_signed(deployment, reference):
    """Whoever can submit a run cannot get its own ServerApp run with the consortium's key: the server runtime
    refuses the package before any message is sent, and keeps it for the operator's review."""
    marker = deployment.root / "the-server-package-code-ran"

    def rogue(app: Path) -> None:
        with (app / "server" / "app.py").open("a") as f:
            f.write(f"\nopen({str(marker)!r}, 'w').write('a submitted ServerApp ran with the signing key')\n")

    package = make_app(deployment.root / "rogue" / "retune-fl", rogue)
    digest = hashlib.sha256(fab_of(package)).hexdigest()
    proc, run_id = deployment.submit("rogue", package, timeout=20.0)
    _finish(proc)
    run = deployment.run(run_id)
    assert run["status"] == "finished:failed" and "has not approved" in run["status-details"], run
    assert not marker.exists() and not (deployment.layout.server / "runs" / "rogue").exists()
    for k in range(HOSPITALS):
        assert not [e for e in deployment.audit(k) if e["run_id"] == int(run_id)]  # nothing reached a hospital
    pending = Path(deployment.layout.server_files().approved_apps).parent / "pending" / f"{digest}.fab"
    assert pending.read_bytes() == fab_of(package)


def test_a_package_with_modified_client_code_is_refused_at_every_hospital(deployment, reference):
    from shared.app_packages import AppPackage, add_approval

    marker = deployment.root / "the-package-code-ran"

    def tamper(app: Path) -> None:
        with (app / "client" / "app.py").open("a") as f:
            f.write(f"\nopen({str(marker)!r}, 'w').write('modified client code ran')\n")

    tampered = make_app(deployment.root / "tampered" / "retune-fl", tamper)
    digest = hashlib.sha256(fab_of(tampered)).hexdigest()
    add_approval(Path(deployment.layout.server_files().approved_apps), AppPackage.read(fab_of(tampered)),
                 "a careless operator")  # the hospitals still refuse it
    proc, run_id = deployment.submit("tampered", tampered, timeout=20.0)
    _finish(proc)
    run = deployment.run(run_id)
    assert run["fab-hash"] == digest and run["status"] == "finished:failed", run
    assert "fewer than min-hospitals" in run["status-details"]
    listed = {r["run_id"]: r for r in status(deployment.root / "fed")["runs"]}
    assert listed[run["run-id"]]["status"] == "finished:failed"
    assert not marker.exists()
    assert not (deployment.layout.server / "runs" / "tampered" / "checkpoint").exists()
    for k in range(HOSPITALS):
        refusals = [e for e in deployment.audit(k) if e["run_id"] == int(run["run-id"])]
        assert refusals and all(e["event"] == REFUSED and e["fab_hash"] == digest for e in refusals)
        assert verify_log(deployment.layout.hospital_files(k).audit_log).ok
        pending = Path(deployment.layout.hospital_files(k).approved_apps).parent / "pending" / f"{digest}.fab"
        assert pending.read_bytes() == fab_of(tampered)  # kept for IT's review with `retune approve --fab`


def test_a_supernode_killed_mid_round_costs_one_round_and_rejoins(deployment, reference):
    proc, run_id = deployment.submit("supernode-killed", timeout=20.0, rounds_per_stage=3)
    deployment.wait_rounds("supernode-killed", 1)
    time.sleep(1.0)  # round 2's train messages are out
    deployment.kill("hospital-2")
    deployment.wait_rounds("supernode-killed", 2)
    up(deployment.root / "fed", app=None)  # restarts exactly what is down, once Flower has let the node go
    back_at = deployment.state("supernode-killed")["server_round"]
    assert back_at < 5, "the run ended before the restarted hospital could rejoin: give it more rounds"
    _finish(proc)
    history = deployment.state("supernode-killed")["history"]
    assert len(history) == 6 and history[1]["clients"] == 2
    declined = [(d["hospital"], d["phase"]) for d in history[1]["declined"]]
    assert ("hospital-2", "train") in declined and {h for h, _ in declined} == {"hospital-2"}  # named, not node-<id>
    assert all(r["clients"] == 3 for r in history[back_at + 1:]), "the restarted hospital rejoined"
    assert deployment.run(run_id)["status"] == "finished:completed"


def test_superlink_and_serverapp_killed_mid_run_resume_to_the_same_adaptors(deployment, reference):
    first, orphan = deployment.submit("resumed", min_hospitals=HOSPITALS)  # every round waits for all three
    deployment.wait_rounds("resumed", 2)
    deployment.kill("serverapp")
    deployment.kill("superlink")
    first.wait(timeout=120)
    up(deployment.root / "fed", app=None)
    assert deployment.flwr("stop", orphan, CONNECTION).returncode == 0  # the killed run's entry
    again, run_id = deployment.submit("resumed", min_hospitals=HOSPITALS)  # ... however soon they reconnect
    _finish(again)
    assert deployment.run(run_id)["status"] == "finished:completed"
    state = deployment.state("resumed")
    assert state["server_round"] == 4 and [r["clients"] for r in state["history"]] == [3, 3, 3, 3]
    ours = load_file(deployment.layout.server / "runs" / "resumed" / "checkpoint" / "adaptors.safetensors")
    theirs = load_file(deployment.layout.server / "runs" / "reference" / "checkpoint" / "adaptors.safetensors")
    assert set(ours) == set(theirs)
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-6)


def test_strangers_are_turned_away(deployment, strangers):
    logs = {}
    for name, proc in strangers.items():
        try:
            logs[name] = proc.communicate(timeout=120)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{name} SuperNode still running after 120 s")
        assert proc.returncode != 0 and "could not establish a connection" in logs[name], logs[name][-2000:]
    assert "Failed to activate SuperNode" in logs["unregistered"]
    assert "CERTIFICATE_VERIFY_FAILED" in logs["wrong-ca"]
    online = {h["node_id"] for h in status(deployment.root / "fed")["hospitals"].values() if h["online"]}
    assert online == set(load_record(deployment.root / "fed")["node_ids"].values())
    # A runtime without the hospital's SuperExec secret gets no task from its SuperNode.
    runtime_api = f"127.0.0.1:{load_record(deployment.root / 'fed')['ports']['runtime'][0]}"
    rogue = HospitalRuntime(RuntimeSettings(runtime_api, b"0" * 64))
    with pytest.raises(httpx.HTTPStatusError) as refused:
        rogue.poll_once()
    assert refused.value.response.status_code in (401, 403)
    rogue.close()
