"""``deploy/operator.md`` and ``deploy/hospital-it.md`` followed step by step: every shell block of both guides is
run as written, in the order a consortium with two hospitals would, on 127.0.0.1. Only the settings each guide's
section 0 asks the reader to choose, and the files the parties hand each other, come from the test."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.processes import free_port, port_open
from research.phantom import write_phantom
from server.state import STATE
from shared.signing import verify_checkpoint
from tests.conftest import make_app

pytestmark = pytest.mark.timeout(900)
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BACKGROUND = "# keeps running"


def sections(guide: Path) -> dict[str, list[str]]:
    """The ```bash blocks of each numbered section (``## 3. Title`` -> "3")."""
    found: dict[str, list[str]] = {}
    current = None
    for part in re.split(r"^(## .*)$", guide.read_text(), flags=re.M):
        heading = re.match(r"## (\d+)\.", part)
        if heading:
            current = heading.group(1)
        elif current is not None:
            found[current] = re.findall(r"```bash\n(.*?)```", part, flags=re.S)
    return found


class Party:
    """One party's shell: blocks run with ``bash``, exported variables carried from block to block; lines marked
    ``# keeps running`` start as services (stopped at the end of the test)."""

    def __init__(self, name: str, root: Path, env: dict[str, str]) -> None:
        self.name, self.root = name, root
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
        self.services: list[subprocess.Popen] = []

    def run(self, block: str) -> str:
        """Run a block; returns what it printed on stdout."""
        chunk: list[str] = []
        out = ""
        for line in block.splitlines():
            if line.rstrip().endswith(BACKGROUND):
                out += self._shell(chunk)
                chunk = []
                self._service(line.split(BACKGROUND)[0])
            else:
                chunk.append(line)
        return out + self._shell(chunk)

    def _shell(self, lines: list[str]) -> str:
        if not any(line.strip() and not line.lstrip().startswith("#") for line in lines):
            return ""
        env_file = self.root / f".{self.name}.env"
        script = "set -euo pipefail\n" + "\n".join(lines) + f"\nenv -0 > {env_file}\n"
        result = subprocess.run(["bash", "-c", script], env=self.env, input="y\n", capture_output=True, text=True,
                                timeout=600, cwd=self.root)
        assert result.returncode == 0, f"{self.name}: {lines}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        self.env = dict(entry.split("=", 1) for entry in env_file.read_text().split("\0") if "=" in entry)
        (self.root / f"{self.name}.log").open("a").write(result.stdout + result.stderr)
        return result.stdout

    def _service(self, command: str) -> None:
        log = open(self.root / f"{self.name}-service-{len(self.services)}.log", "wb")  # noqa: SIM115
        self.services.append(subprocess.Popen(["bash", "-c", command], env=self.env, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root))

    def stop(self) -> None:
        for proc in self.services:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.services:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def _wait(what: str, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _stage_stand_in_biomedclip(folder: Path) -> None:
    """What the download gives, offline: an open_clip directory (config + weights). The real BiomedCLIP cannot be
    fetched here, so a small open_clip model's folder stands in for it."""
    import open_clip
    import torch

    from shared.backbone import load_backbone

    folder.mkdir(parents=True)
    config = open_clip.get_model_config("retune-tiny-random")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    torch.save(load_backbone("retune-tiny-random", device="cpu").model.state_dict(),
               folder / "open_clip_pytorch_model.bin")


def test_the_guides_followed_step_by_step(tmp_path):
    operator_md, hospital_md = sections(REPO / "deploy" / "operator.md"), sections(REPO / "deploy" / "hospital-it.md")
    assert set(operator_md) >= {str(n) for n in range(8)} and set(hospital_md) >= {str(n) for n in range(9)}
    app = make_app(tmp_path / "app" / "retune-fl")
    superlink_port, gateway_port = free_port(), free_port()
    op = Party("operator", tmp_path, {"FED": str(tmp_path / "operator"), "SERVER_NAME": "127.0.0.1",
                                      "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(gateway_port),
                                      "SUPERLINK_PORT": str(superlink_port), "APP": str(app)})
    parties = [op]
    try:
        for section in ("0", "1", "2"):
            for block in operator_md[section]:
                op.run(block)
        _wait("the SuperLink and the gateway", lambda: port_open("127.0.0.1", superlink_port)
              and port_open("127.0.0.1", gateway_port))
        op.run(operator_md["3"][0])
        fed = Path(op.env["FED"])
        (fed / "incoming").mkdir()

        hospitals = []
        for k, name in enumerate(("st-mary", "royal-free")):
            home = tmp_path / name
            write_phantom(home / "data", n=60, hospital=k, seed=0, size=64)  # the hospital's own export
            h = Party(name, tmp_path, {"H": str(home), "NAME": name, "LABELS": str(home / "data" / "manifest.csv"),
                                       "GATEWAY": f"127.0.0.1:{gateway_port}", "RUNTIME_PORT": str(free_port()),
                                       "RETUNE_CACHE": str(home / "cache")})
            parties.append(h)
            h.run(hospital_md["0"][0])
            h.run(hospital_md["1"][0])
            shutil.copy(home / "keys" / "auth.pub", fed / "incoming" / f"{name}.pub")  # the hand-over, both ways
            shutil.copy(fed / "server" / "certs" / "ca.crt", home / "ca.crt")
            shutil.copy(fed / "server" / "keys" / "consortium.pub", home / "consortium.pub")
            checked = json.loads(h.run(hospital_md["2"][0]))
            assert checked["rows"] == 60 and not checked["missing"]
            h.run(hospital_md["3"][0])
            op.env["HOSPITAL"] = name
            assert "node" in op.run(operator_md["4"][0]).lower()
            h.run(hospital_md["5"][0])
            hospitals.append(h)

        def online() -> int:
            listed = subprocess.run([str(BIN / "flwr"), "supernode", "list", "retune", "--format", "json"],
                                    env=op.env, capture_output=True, text=True)
            return sum(n["status"] == "online" for n in json.loads(listed.stdout)["nodes"]) if listed.returncode == 0 \
                else 0

        _wait("both hospitals online", lambda: online() == 2)
        op.run(operator_md["4"][1])  # the roster of every member's key, handed to each hospital
        for h in hospitals:
            shutil.copy(fed / "roster.json", Path(h.env["H"]) / "roster.json")

        op.run(operator_md["5"][0])
        (fab,) = fed.glob("*.fab")
        for h in hospitals:
            h.env["FAB"] = str(fab)
            shown = h.run(hospital_md["6"][0])  # what is pending (nothing refused yet), then the review
            assert "no refused app packages" in shown and "equal the installed hospital runtime" in shown
            assert f"approved {hashlib.sha256(fab.read_bytes()).hexdigest()}" in shown

        op.run(operator_md["6"][0])  # flwr run --stream, then flwr list
        state = json.loads((fed / "server" / "runs" / "study-1" / STATE).read_text())
        assert state["server_round"] == 1 and state["history"][0]["clients"] == 2
        assert set(state["history"][0]["bytes_up_per_hospital"]) == {"st-mary", "royal-free"}
        verify_checkpoint(fed / "server" / "runs" / "study-1" / "checkpoint", fed / "server" / "keys" / "consortium.pub")
        for h in hospitals:
            audit = h.run(hospital_md["7"][0])
            assert "sent" in audit and "arrays+metrics+site" in audit
        attacked = hospitals[0].run(hospital_md["8"][0])  # the red team, under this hospital's node config
        assert "attacks held" in attacked and "FAILED" not in attacked

        started = subprocess.run([str(BIN / "flwr"), "run", str(app), "retune", "--format", "json", "--run-config",
                                  'stages=1 rounds-per-stage=50 run-dir="runs/study-2"'], env=op.env,
                                 capture_output=True, text=True, timeout=120)
        op.env["RUN_ID"] = str(json.loads(started.stdout)["run-id"])
        op.run(operator_md["6"][1])  # flwr stop
        _wait("the stopped run", lambda: "stopped" in subprocess.run(
            [str(BIN / "flwr"), "list", "retune", "--format", "json"], env=op.env, capture_output=True,
            text=True).stdout)

        _stage_stand_in_biomedclip(tmp_path / "st-mary" / "models" / "biomedclip")
        embedded = json.loads(hospitals[0].run(hospital_md["4"][0]))
        assert embedded["backbone"]["spec"] == str(tmp_path / "st-mary" / "models" / "biomedclip")
        assert embedded["backbone"]["pretrained"] and embedded["images"]["train"] > 0

        from deploy.certs import make_hospital_keys

        leaving = make_hospital_keys(tmp_path / "leaving", "leaving")
        op.env["HOSPITAL"] = "leaving"
        shutil.copy(leaving.public_key, fed / "incoming" / "leaving.pub")
        registered = op.run(operator_md["4"][0])
        op.env["NODE_ID"] = re.search(r"(\d{6,})", registered).group(1)
        op.run(operator_md["4"][2])  # unregister
        assert op.env["NODE_ID"] not in subprocess.run([str(BIN / "flwr"), "supernode", "list", "retune"],
                                                       env=op.env, capture_output=True, text=True).stdout

        before = (fed / "server" / "keys" / "consortium.pub").read_bytes()
        op.run(operator_md["7"][0])  # rotate the signing key and the certificates
        assert (fed / "server" / "keys" / "consortium.pub").read_bytes() != before
    finally:
        for party in parties:
            party.stop()
