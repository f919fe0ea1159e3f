"""``retune federation up|status|down``: a deployed federation as real processes on this machine.

``up --hospitals N --dir DIR`` plays every party with the same commands they run (:mod:`deploy.topology`):

- the operator makes the CA, the SuperLink certificate and the consortium signing key, starts the SuperLink (TLS,
  SuperNode authentication, ``DIR/server/state.db``, process isolation, no run-time installs) on 127.0.0.1, the
  Fleet gateway and its ServerApp runtime (``retune server serve``: approved app packages only, the only holder of
  the signing key), and registers each hospital's public key;
- each hospital ``hospital-K`` makes its own key pair, gets phantom chest X-rays as its data, embeds them once,
  approves the app package in ``--app`` (a stand-in for its IT's review) and starts its SuperNode and its own
  runtime, with its audit log, approved list and ε ledger under ``DIR/hospital-K/``.

It writes ``DIR/flwr/config.toml`` with the connection ``retune``, so that
``FLWR_HOME=DIR/flwr flwr run . retune --stream`` submits a run with Flower's own CLI, and ``DIR/federation.json``,
the record of what it started: ``status`` reads it, ``down`` stops exactly those processes, and ``up`` again
restarts whatever is not running, with the same keys, ports and data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from deploy.processes import Process, free_port, port_open, spawn, stop
from deploy.topology import (QUIET_ENV, HospitalFiles, ServerFiles, Service, hospital_floors, hospital_services,
                             server_services)
from shared.errors import RetuneError

RECORD = "federation.json"
CONNECTION = "retune"
#: Flower's SuperNode heartbeat period in seconds (a node missing two is taken offline).
HEARTBEAT_PERIOD = 30.0
HOST = "127.0.0.1"
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Layout:
    """Where everything lives under ``DIR``."""

    root: Path

    @property
    def server(self) -> Path:
        return self.root / "server"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    def hospital(self, k: int) -> Path:
        return self.root / f"hospital-{k}"

    def server_files(self) -> ServerFiles:
        certs, keys = self.server / "certs", self.server / "keys"
        return ServerFiles(str(certs / "ca.crt"), str(certs / "server.pem"), str(certs / "server.key"),
                           str(certs / "superexec.secret"), str(keys / "consortium.key"),
                           str(self.server / "state.db"), str(self.server / "approved.json"),
                           str(self.server / "runtime"))

    def hospital_files(self, k: int) -> HospitalFiles:
        h = self.hospital(k)
        return HospitalFiles(str(h / "ca.crt"), str(h / "keys" / "auth.key"), str(h / "keys" / "superexec.secret"),
                             str(h / "data" / "manifest.csv"), str(h / "cache"), str(h / "audit.jsonl"),
                             str(h / "approved.json"), str(h / "privacy-ledger.json"), str(h / "consortium.pub"),
                             str(h / "roster.json"))


def load_record(root: Path) -> dict:
    path = Path(root) / RECORD
    if not path.is_file():
        raise RetuneError(f"{root} holds no federation ({RECORD} is missing): start one with "
                          f"`retune federation up --dir {root}`")
    return json.loads(path.read_text())


def _save_record(root: Path, record: dict) -> None:
    path = Path(root) / RECORD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def _env(layout: Layout, service: Service) -> dict[str, str]:
    home = layout.root / "homes" / service.name
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **QUIET_ENV, **service.env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    if service.site != "server":  # a hospital's runtime: its own cache for the staged backbone, one core each
        env.update({"RETUNE_CACHE": str(layout.hospital(int(service.site.split("-")[1])) / "cache"),
                    "OMP_NUM_THREADS": "1"})
    return env


def _argv(service: Service) -> list[str]:
    program = shutil.which(service.argv[0], path=str(BIN)) or service.argv[0]
    return [program, *service.argv[1:]]


def flwr(layout: Layout, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The operator's flwr CLI with the federation's connection."""
    env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(layout.flwr_home)}
    return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def services(layout: Layout, record: dict) -> list[Service]:
    """Every process of the federation in start order, from the one topology compose uses too."""
    ports = record["ports"]
    listed = server_services(layout.server_files(), HOST, HOST, HOST, ports["superlink"], ports["gateway"])
    for k, name in enumerate(record["hospitals"]):
        listed += hospital_services(k, name, layout.hospital_files(k), f"{HOST}:{ports['gateway']}", HOST, HOST,
                                    ports["runtime"][k], {**record.get("node_config", {}),
                                                          **record.get("floors", {}).get(name, {})})
    return listed


def _setup(layout: Layout, hospitals: int, images: int, image_size: int, seed: int, node_config: dict) -> dict:
    """First ``up``: keys, certificates, data and ports (nothing is started yet)."""
    from deploy.certs import make_certificates, make_hospital_keys
    from research.phantom import write_phantom
    from shared.identity import Roster
    from shared.signing import generate_keys

    files = layout.server_files()
    make_certificates(Path(files.ca_cert).parent, sans=[HOST, "localhost"])
    generate_keys(Path(files.signing_key).parent)
    names = [f"hospital-{k}" for k in range(hospitals)]
    for k, name in enumerate(names):
        make_hospital_keys(Path(layout.hospital_files(k).auth_key).parent, name)
    roster = Roster.write(layout.server / "roster.json", {name: Path(layout.hospital_files(k).auth_key).with_suffix(
        ".pub") for k, name in enumerate(names)})  # the operator's roster of the hospitals' public keys
    for k, name in enumerate(names):
        h = layout.hospital_files(k)
        for public, there in ((files.ca_cert, h.ca_cert), (roster, h.roster),  # what the operator hands every
                              (Path(files.signing_key).with_suffix(".pub"), h.consortium_key)):  # hospital: public
            shutil.copy(public, there)
        write_phantom(Path(h.manifest).parent, n=images, hospital=k, seed=seed, size=image_size)
    layout.flwr_home.mkdir(parents=True, exist_ok=True)
    ports = {"superlink": free_port(), "gateway": free_port(), "runtime": [free_port() for _ in names]}
    (layout.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{HOST}:{ports["superlink"]}"\nroot-certificates = "{Path(files.ca_cert).resolve()}"\n')
    return {"hospitals": names, "ports": ports, "node_ids": {}, "processes": {}, "node_config": node_config}


def _embed(layout: Layout, record: dict, backbone: str) -> None:
    """Each hospital embeds its images once, into its own cache, as its IT does (``retune embed``)."""
    for k, name in enumerate(record["hospitals"]):
        files = layout.hospital_files(k)
        env = {**os.environ, **QUIET_ENV, "RETUNE_CACHE": files.cache}
        result = subprocess.run([str(BIN / "retune"), "embed", "--data", files.manifest, "--cache", files.cache,
                                 "--backbone", backbone], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RetuneError(f"{name} could not embed its images: {result.stderr.strip()[-800:]}")


def approve_app(layout: Layout, record: dict, app: Path) -> str:
    """Stand in for the operator and each hospital's IT: approve the app package ``flwr run APP`` will send, in the
    server runtime's list and every hospital's; returns its hash."""
    from flwr.cli.build import build_fab_from_disk

    from shared.app_packages import AppPackage, add_approval, find_approval

    try:
        package = AppPackage.read(build_fab_from_disk(Path(app)))
    except ValueError as exc:
        raise RetuneError(f"{app} is not a Flower app to approve ({exc}): pass --app with the folder you will "
                          "`flwr run`") from None
    lists = [Path(layout.server_files().approved_apps)] + [Path(layout.hospital_files(k).approved_apps)
                                                          for k in range(len(record["hospitals"]))]
    for approved in lists:
        if find_approval(approved, package.fab_hash) is None:
            add_approval(approved, package, "retune federation up", f"local demo: the app package in {app}")
    return package.fab_hash


def _wait(what: str, ready, timeout: float, process: Process | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process is not None and not process.alive():
            raise RetuneError(f"{process.name} exited while waiting for {what}; see {process.log}")
        if time.monotonic() > deadline:
            raise RetuneError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def online_nodes(layout: Layout) -> set[int] | None:
    """Node ids the SuperLink reports online (None: the SuperLink cannot be asked)."""
    result = flwr(layout, "supernode", "list", CONNECTION, "--format", "json")
    if result.returncode != 0:
        return None
    return {int(n["node-id"]) for n in json.loads(result.stdout).get("nodes", []) if n.get("status") == "online"}


def _register(layout: Layout, record: dict) -> None:
    for k, name in enumerate(record["hospitals"]):
        if name in record["node_ids"]:
            continue
        pub = Path(layout.hospital_files(k).auth_key).with_suffix(".pub")
        result = flwr(layout, "supernode", "register", str(pub), CONNECTION, "--format", "json")
        if result.returncode != 0:
            raise RetuneError(f"registering {name}'s public key failed: {(result.stdout + result.stderr)[-500:]}")
        record["node_ids"][name] = int(json.loads(result.stdout)["node-id"])


def up(root: Path, hospitals: int = 3, images: int = 300, image_size: int = 128, seed: int = 0,
       app: Path | None = Path("."), backbone: str | None = None, dp_epsilon: float | None = None,
       timeout: float = 180.0, floors: list[str] | None = None) -> dict:
    """Start (or restart what is not running of) the federation in ``root``; returns its record. ``floors``: each
    hospital's privacy floor (``key=value ...`` for all, ``hospital-K: key=value ...`` for one; see
    :func:`deploy.topology.hospital_floors`), kept in the record; given again, they replace it."""
    layout = Layout(Path(root).resolve())
    if (layout.root / RECORD).exists():
        record = load_record(layout.root)
    else:
        if hospitals < 2:
            raise RetuneError("a federation needs at least 2 hospitals (--hospitals)")
        node_config = {**({"backbone": backbone} if backbone else {}),
                       **({"dp-max-epsilon": str(dp_epsilon)} if dp_epsilon else {})}
        record = _setup(layout, hospitals, images, image_size, seed, node_config)
        _save_record(layout.root, record)
        _embed(layout, record, backbone or "retune-minilm-phantom")
    if floors:
        record["floors"] = hospital_floors(floors, record["hospitals"])
        _save_record(layout.root, record)
    if app is not None:
        record["approved_app"] = approve_app(layout, record, app)
    started: list[Process] = []
    try:
        for service in services(layout, record):
            known = record["processes"].get(service.name)
            if known and Process(**known).alive():
                continue
            if service.name.startswith("hospital-"):
                _register(layout, record)  # a hospital's SuperNode connects only once its key is registered
                node = record["node_ids"][service.name]
                # A SuperNode that died without saying goodbye stays online for up to two heartbeats (60 s), and
                # Flower refuses to activate it again until then.
                _wait(f"the SuperLink to see {service.name}'s previous SuperNode gone",
                      lambda: node not in (online_nodes(layout) or set()), 2 * HEARTBEAT_PERIOD + timeout)
            proc = spawn(service.name, _argv(service), layout.root / "logs" / f"{service.name}.log",
                         _env(layout, service), layout.server if service.site == "server" else
                         layout.hospital(int(service.site.split("-")[1])))
            started.append(proc)
            record["processes"][service.name] = proc.as_dict()
            _save_record(layout.root, record)
            if service.name in ("superlink", "gateway"):
                port = record["ports"][service.name]
                _wait(f"{service.name} to listen on {HOST}:{port}", lambda: port_open(HOST, port), timeout, proc)
            if service.name.startswith("hospital-"):
                _wait(f"{service.name} to connect", lambda: node in (online_nodes(layout) or set()), timeout, proc)
    except BaseException:
        stop(started)
        raise
    return record


def status(root: Path) -> dict:
    """Processes (running or not), hospitals (online or not, by name) and runs (with Flower's status)."""
    layout = Layout(Path(root).resolve())
    record = load_record(layout.root)
    processes = {name: {"pid": p["pid"], "running": Process(**p).alive(), "log": p["log"]}
                 for name, p in record["processes"].items()}
    online = online_nodes(layout) if processes.get("superlink", {}).get("running") else None
    hospitals = {name: {"node_id": node, "online": None if online is None else
                        node in online and processes.get(name, {}).get("running", False)}
                 for name, node in record["node_ids"].items()}
    runs: list[dict] = []
    if online is not None:
        result = flwr(layout, "list", CONNECTION, "--format", "json")
        if result.returncode == 0:
            runs = [{"run_id": r.get("run-id"), "status": r.get("status"), "app": r.get("fab-id"),
                     "details": r.get("status-details", "")} for r in json.loads(result.stdout).get("runs", [])]
    return {"dir": str(layout.root), "connection": CONNECTION, "flwr_home": str(layout.flwr_home),
            "processes": processes, "hospitals": hospitals, "runs": runs}


def down(root: Path) -> list[str]:
    """Stop exactly the processes ``up`` started (still running, same start time); returns their names."""
    layout = Layout(Path(root).resolve())
    record = load_record(layout.root)
    stopped = stop([Process(**p) for p in reversed(list(record["processes"].values()))])
    _save_record(layout.root, record)
    return stopped
