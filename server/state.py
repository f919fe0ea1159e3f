"""Server run state, persisted atomically after every round so that a restarted server resumes.

``RUN_DIR/state.json`` is the commit point: it names the adaptor (and optimiser) files of the last completed
round, written before it. A crash leaves either the previous state or the new one, never half of one.

With the consortium's signing key every committed state is **sealed** (:func:`shared.signing.seal`: the state and
the hash of each file it names), and a resumption checks the seal before anything is used or signed: a run folder
changed since (adaptors zeroed, a history edited) stops the resumption with a clear error, instead of being carried
on and signed as the consortium's. A seal cannot tell an older folder, validly sealed in its day, from the latest
one; every run folder has an identity of its own (``folder``, random, sealed with the state), and the key holder's
:class:`SealRegister`, kept outside the run folders, remembers each folder identity's last sealed round: a copy from
before it is refused wherever it is put back.
"""

from __future__ import annotations

import fcntl
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load, save

from shared.cache import atomic_write_bytes, atomic_write_text
from shared.config import OPERATIONAL_KEYS, FederationConfig
from shared.errors import RetuneError
from shared.signing import SignatureError, check_seal, seal

STATE = "state.json"
#: Settings that may differ between a run and its resumption (where things are, not what is computed).
_LOCATION_KEYS = {"run-dir", "sim-dir", *OPERATIONAL_KEYS}


class SealRegister:
    """The last round sealed in each run folder, by the folder's identity (``RunState.folder``), in one JSON file kept
    by the holder of the signing key outside the run folders (the server runtime's ``--state``; a simulation's
    ``keys/``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, int]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def check(self, run_dir: Path, folder: str, server_round: int) -> None:
        """Refuse a run folder whose state is older than the last one sealed in it (wherever it now lies)."""
        sealed = self._read().get(folder, 0)
        if server_round < sealed:
            raise RetuneError(f"{run_dir} holds round {server_round} of its run, but round {sealed} was sealed in this "
                              "run folder: it was put back (or copied) from an earlier state. Restore its latest "
                              "state or start the run in a new folder")

    def record(self, folder: str, server_round: int) -> None:
        """Remember that ``server_round`` was sealed in ``folder`` (under an exclusive lock, written atomically)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            rounds = self._read()
            rounds[folder] = server_round
            atomic_write_text(self.path, json.dumps(rounds, indent=1, sort_keys=True))


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _LOCATION_KEYS}


@dataclass
class RunState:
    """Where the run is (next stage and round to run), its history, and the global adaptors."""

    run_dir: Path
    config: dict
    stage: int = 0
    round: int = 0
    server_round: int = 0
    history: list[dict] = field(default_factory=list)
    arrays: ArrayRecord | None = None
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    backbone: str | None = None
    hospitals: dict[int, str] = field(default_factory=dict)
    seals: SealRegister | None = None
    folder: str = field(default_factory=lambda: secrets.token_hex(16))

    @classmethod
    def open(cls, config: FederationConfig, initial: ArrayRecord | None,
             key: Ed25519PrivateKey | None = None, seals: SealRegister | None = None) -> RunState:
        """Resume the run in ``config.run_dir``, or start one from ``initial`` adaptors. With ``key`` the folder's
        seal is checked first; a folder sealed by a key, opened without one, is refused too; with ``seals``, a
        folder older than its last sealed round is refused, and every commit is recorded there."""
        run_dir = Path(config.run_dir)
        path = run_dir / STATE
        if not path.exists():
            return cls(run_dir, config.to_run_config(), arrays=initial, seals=seals)
        saved = json.loads(path.read_text())
        files = {name: (run_dir / name).read_bytes() for name in (saved["arrays"], saved.get("optimizer")) if name}
        if key is not None or "seal" in saved:
            try:
                if key is None:
                    raise SignatureError("it is sealed, and this ServerApp has no signing key to check the seal")
                check_seal(saved, files, key.public_key())
            except SignatureError as exc:
                raise RetuneError(f"{run_dir} cannot be resumed: {exc}. Restore the folder from a backup or start "
                                  "the run in a new folder") from None
        folder = saved.get("folder") or str(run_dir.resolve())  # a folder sealed before it had an identity
        if seals is not None:
            seals.check(run_dir, folder, saved["server_round"])
        if _comparable(saved["config"]) != _comparable(config.to_run_config()):
            changed = sorted(k for k, v in _comparable(config.to_run_config()).items() if saved["config"].get(k) != v)
            raise RetuneError(f"{run_dir} holds a run with different settings ({', '.join(changed)}): "
                              "resume it with the same settings or choose another output folder")
        arrays = ArrayRecord({k: Array(v) for k, v in load(files[saved["arrays"]]).items()})
        optimizer = load(files[saved["optimizer"]]) if saved.get("optimizer") else {}
        return cls(run_dir, saved["config"], saved["stage"], saved["round"], saved["server_round"],
                   saved["history"], arrays, optimizer, saved.get("backbone"),
                   {int(node): name for node, name in saved.get("hospitals", {}).items()}, seals, folder)

    @property
    def done(self) -> bool:
        return self.stage >= int(self.config["stages"])

    def commit(self, arrays: ArrayRecord, optimizer: dict[str, np.ndarray], record: dict,
               backbone: str | None = None, hospitals: dict[int, str] | None = None,
               key: Ed25519PrivateKey | None = None) -> None:
        """Record a completed round (and the run's backbone identity and hospital names so far) and advance the
        position; persisted, and sealed with ``key``, before returning."""
        self.arrays, self.optimizer = arrays, optimizer
        self.backbone = backbone or self.backbone
        self.hospitals.update(hospitals or {})
        self.history.append(record)
        self.server_round += 1
        self.round += 1
        if self.round >= int(self.config["rounds-per-stage"]):
            self.stage, self.round = self.stage + 1, 0
        self.run_dir.mkdir(parents=True, exist_ok=True)
        name = f"global-{self.server_round:05d}.safetensors"
        files = {name: save({k: np.ascontiguousarray(a.numpy()) for k, a in arrays.items()})}
        opt_name = f"optimizer-{self.server_round:05d}.safetensors" if optimizer else None
        if opt_name:
            files[opt_name] = save({k: np.ascontiguousarray(v) for k, v in optimizer.items()})
        for file, data in files.items():
            atomic_write_bytes(self.run_dir / file, data)
        state = {"config": self.config, "folder": self.folder, "stage": self.stage, "round": self.round,
                 "server_round": self.server_round,
                 "arrays": name, "optimizer": opt_name, "backbone": self.backbone,
                 "hospitals": {str(node): host for node, host in sorted(self.hospitals.items())},
                 "history": self.history}
        if key is not None:
            state["seal"] = seal(state, files, key)
        atomic_write_text(self.run_dir / STATE, json.dumps(state, indent=1))
        if self.seals is not None:
            self.seals.record(self.folder, self.server_round)
        for old in self.run_dir.glob("*-[0-9][0-9][0-9][0-9][0-9].safetensors"):
            if old.name not in (name, opt_name):
                old.unlink()
