"""Real processes on 127.0.0.1, laid out as in ``docker-compose.yml``: a TLS SuperLink with SuperNode
authentication and process isolation, its ServerApp SuperExec, and per hospital a SuperNode with its ClientApp
SuperExec, all with certificates, keys and SuperExec secrets from ``deploy.certs``. Registered hospitals train one
round of ``flwr run``; everyone else is turned away.

One federation is started for the module, together with the parties that must fail: a SuperNode with an
unregistered key, a plaintext one, one without the federation CA, and a SuperExec without the secret. Every
process carries a tag in its environment, and everything that carries it is killed at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deploy.certs import CertBundle, make_certificates
from server.state import STATE
from shared.phantom import write_phantom

pytestmark = pytest.mark.timeout(480)

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
CONNECTION = "retune-tls"
TAG_VAR = "RETUNE_TLS_TEST_TAG"
# The app package Flower builds (FAB) carries source files only, not the shipped backbone's weights: this test is
# about the transport, so it runs the tiny random backbone that open_clip builds from a config.
RUN_CONFIG = ('stages=1 rounds-per-stage=1 local-epochs=1 min-hospitals=2 round-timeout=120.0 '
              'backbone="retune-tiny-random" run-dir="{run_dir}"')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries this test's tag (ours and every descendant, detached or not)."""
    marker = f"{TAG_VAR}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@dataclass
class Federation:
    """The started processes, their logs and the paths a test needs."""

    root: Path
    certs: CertBundle
    port: int
    tag: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    node_ids: dict[str, int] = field(default_factory=dict)

    def env(self, home: str) -> dict[str, str]:
        """A subprocess environment: offline, no telemetry, its own FLWR_HOME, tagged for cleanup."""
        flwr_home = self.root / "homes" / home
        flwr_home.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(flwr_home),
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0", TAG_VAR: self.tag}

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start(self, name: str, args: list[str], home: str) -> subprocess.Popen:
        with open(self.log(name), "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env(home), cwd=self.root,
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """The flwr CLI as the operator runs it (its config.toml holds the TLS connection)."""
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env("operator"), cwd=self.root, timeout=timeout,
                              capture_output=True, text=True)

    def supernode(self, name: str, *extra: str, port: int | None = None) -> subprocess.Popen:
        args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port",
                str(port or _free_port()), *extra]
        return self.start(name, args, name)

    def superexec(self, name: str, runtime_api: str, *extra: str) -> subprocess.Popen:
        return self.start(name, [str(BIN / "flower-superexec"), "--runtime-api-address", runtime_api, *extra], name)

    def stop(self) -> None:
        """SIGTERM everything tagged, then SIGKILL what is left after 10 s; reap our direct children."""
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in _tagged_pids(self.tag):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while _tagged_pids(self.tag) and time.monotonic() < deadline:
                for proc in self.procs.values():
                    proc.poll()
                time.sleep(0.2)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _wait(what: str, ready, timeout: float, fed: Federation, watch: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if watch and fed.procs[watch].poll() is not None:
            pytest.fail(f"{watch} exited while waiting for {what}:\n{fed.log(watch).read_text()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _write_connection(fed: Federation) -> None:
    config = (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
              f'address = "127.0.0.1:{fed.port}"\nroot-certificates = "{fed.certs.ca_cert.resolve()}"\n\n'
              f'[superlink.no-ca]\naddress = "127.0.0.1:{fed.port}"\n')
    (Path(fed.env("operator")["FLWR_HOME"]) / "config.toml").write_text(config)


def _start(fed: Federation, data: list[Path]) -> None:
    c = fed.certs
    fed.start("superlink", [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile",
                            str(c.server_cert), "--ssl-keyfile", str(c.server_key), "--enable-supernode-auth",
                            "--disable-runtime-dependency-installation", "--isolation", "process",
                            "--superexec-auth-secret-file", str(c.superexec_secret),
                            "--host", "127.0.0.1", "--port", str(fed.port)], "superlink")
    _wait("the SuperLink to listen", lambda: _port_open(fed.port), 90, fed, watch="superlink")
    runtime = f"127.0.0.1:{fed.port}"
    fed.superexec("serverapp", runtime, "--root-certificates", str(c.ca_cert), "--superexec-auth-secret-file",
                  str(c.superexec_secret))
    fed.superexec("rogue-superexec", runtime, "--root-certificates", str(c.ca_cert))
    _write_connection(fed)
    for k in (0, 1):  # the operator registers the two hospitals' public keys; hospital-2's key never is
        result = fed.flwr("supernode", "register", str(c.hospitals[k].public_key), CONNECTION, "--format", "json")
        assert result.returncode == 0, result.stdout + result.stderr
        fed.node_ids[f"hospital-{k}"] = int(json.loads(result.stdout)["node-id"])
    give_up = ("--max-retries", "1", "--max-wait-time", "20")
    for k in (0, 1):
        node_config = f'manifest="{data[k] / "manifest.csv"}" cache="{fed.root / f"cache-{k}"}" name="hospital-{k}"'
        port, secret = _free_port(), str(c.hospitals[k].superexec_secret)
        fed.supernode(f"hospital-{k}", "--root-certificates", str(c.ca_cert), "--auth-supernode-private-key",
                      str(c.hospitals[k].private_key), "--isolation", "process", "--superexec-auth-secret-file",
                      secret, "--node-config", node_config, port=port)
        fed.superexec(f"clientapp-{k}", f"127.0.0.1:{port}", "--insecure", "--superexec-auth-secret-file", secret)
    fed.supernode("unregistered", "--root-certificates", str(c.ca_cert), "--auth-supernode-private-key",
                  str(c.hospitals[2].private_key), *give_up)
    fed.supernode("plaintext", "--insecure", *give_up)
    fed.supernode("no-ca", "--auth-supernode-private-key", str(c.hospitals[2].private_key), *give_up)


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("tls")
    data = [write_phantom(root / f"data-{k}", n=60, hospital=k, seed=0, size=64).parent for k in (0, 1)]
    fed = Federation(root, make_certificates(root / "certs", hospitals=3), _free_port(), uuid.uuid4().hex)
    try:
        _start(fed, data)
        yield fed
    finally:
        fed.stop()
        assert not _tagged_pids(fed.tag), "processes of the federation outlived the test"


def _online(fed: Federation) -> set[int]:
    result = fed.flwr("supernode", "list", CONNECTION, "--format", "json")
    if result.returncode != 0:
        return set()
    return {int(n["node-id"]) for n in json.loads(result.stdout)["nodes"] if n["status"] == "online"}


def _refused(fed: Federation, name: str) -> str:
    """Wait (bounded) for SuperNode ``name`` to give up; return its log."""
    try:
        code = fed.procs[name].wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"SuperNode {name} was still running after 120 s:\n{fed.log(name).read_text()[-3000:]}")
    log = fed.log(name).read_text()
    assert code != 0, log[-3000:]
    assert "could not establish a connection to the SuperLink" in log, log[-3000:]
    return log


def test_registered_hospitals_join_and_train_a_round(federation):
    fed = federation
    registered = set(fed.node_ids.values())
    _wait("both registered hospitals online", lambda: _online(fed) == registered, 120, fed, watch="superlink")
    run_dir = fed.root / "run"
    start = time.monotonic()
    result = fed.flwr("run", str(REPO), CONNECTION, "--stream", "--run-config", RUN_CONFIG.format(run_dir=run_dir),
                      timeout=360)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    state_file = run_dir / STATE
    assert state_file.exists(), output[-4000:] + fed.log("superlink").read_text()[-3000:]
    state = json.loads(state_file.read_text())
    assert state["server_round"] == 1 and state["stage"] == 1
    [record] = state["history"]
    assert record["clients"] == 2
    assert set(record["bytes_up_per_hospital"]) == {f"node-{n}" for n in registered}
    assert (run_dir / "checkpoint").is_dir()
    assert "Received 2 results and 0 failures" in output
    for name in ("serverapp", "clientapp-0", "clientapp-1"):  # the apps ran in the SuperExecs holding the secrets
        assert any((fed.root / "homes" / name / "apps").iterdir()), name
    print(f"flwr run over TLS with 2 authenticated hospitals: {time.monotonic() - start:.1f} s")


def test_unregistered_key_is_refused(federation):
    log = _refused(federation, "unregistered")
    assert "Failed to activate SuperNode" in log
    assert "No SuperNode found with the given public key" in federation.log("superlink").read_text()
    assert _online(federation) <= set(federation.node_ids.values())


def test_plaintext_supernode_cannot_connect(federation):
    log = _refused(federation, "plaintext")
    assert "Failed to activate SuperNode" not in log  # turned away before authentication: no TLS, no talk


def test_supernode_and_cli_without_the_federation_ca_refuse_the_superlink(federation):
    log = _refused(federation, "no-ca")
    assert "CERTIFICATE_VERIFY_FAILED" in log
    result = federation.flwr("supernode", "list", "no-ca")
    assert result.returncode != 0
    assert "unavailable" in result.stdout + result.stderr


def test_superexec_without_the_secret_is_refused(federation):
    fed = federation
    try:
        fed.procs["rogue-superexec"].wait(timeout=120)
    except subprocess.TimeoutExpired:
        pass  # still retrying is fine too: what matters is that the SuperLink refused it
    assert "SuperExec authentication failed" in fed.log("superlink").read_text()
    assert not (fed.root / "homes" / "rogue-superexec" / "apps").exists()
