"""The red team's bench: phantom hospitals running the installed hospital code, and a server that is the attacker.

Each :class:`Hospital` is what a deployed site runs, in this process: the installed ClientApp
(:func:`client.app.make_client_app`, with its boundary guard, privacy floor, signature and round checks, DP-SGD and ε
ledger, evaluation record and secure-aggregation client), its own node config, keys, audit log and phantom chest
X-rays, called the way a SuperNode calls it (``app(message, context)``, every message and reply through Flower's
protobuf). Nothing of the defences is replaced. The attacker holds what a malicious server holds: the consortium's
signing key (it signs whatever it likes), the run config (it submits the runs), the public backbone, and images it
obtained elsewhere; a colluding peer is a hospital whose secrets the attacker reads. The bench also knows the
ground truth (the hospitals' labels and updates), to judge what an attack obtained.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from deploy.local_grid import over_the_wire
from shared.config import FederationConfig, run_identity
from shared.signing import ARRAYS_SIGNATURE, RoundBinding, arrays_digest, generate_keys, load_private_key, sign_round
from shared.wire import ARRAYS, ARRAYS_DIGEST, CONFIG, encoded, to_record

#: The server's node id (Flower's SuperLink), the hospitals' are ``FIRST_NODE + k``.
SERVER_NODE, FIRST_NODE = SUPERLINK_NODE_ID, 100


def brief(text: str, width: int = 90) -> str:
    """``text`` cut to ``width`` characters for a one-line verdict, with an ellipsis where it was cut."""
    return text if len(text) <= width else text[:width - 1] + "…"


@dataclass
class Hospital:
    """One phantom hospital: its folder, node config (with the privacy floor of the scenario) and installed app."""

    index: int
    name: str
    folder: Path
    base_config: dict[str, Any]
    node_config: dict[str, Any] = field(default_factory=dict)
    context: Context | None = None
    app: Any = None

    @property
    def node_id(self) -> int:
        return FIRST_NODE + self.index

    def join(self, run_id: int, run_config: dict[str, Any]) -> None:
        """Start serving a new Flower run: a fresh context (its state is empty, as a SuperNode's is per run)."""
        self.context = Context(run_id=run_id, node_id=self.node_id, node_config=dict(self.node_config),
                               state=RecordDict(), run_config=dict(run_config))

    def handle(self, message: Message) -> Message:
        """What the SuperNode relays back for ``message``: the app's reply, or an error reply if it raised."""
        delivered = over_the_wire(message)
        try:
            reply = self.app(delivered, self.context)
        except Exception as exc:  # noqa: BLE001  as a SuperNode reports a ClientApp that raised
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, repr(exc)), reply_to=delivered)
        reply.metadata.__dict__["_message_id"] = f"reply-{delivered.metadata.message_id}"
        return over_the_wire(reply)


@dataclass
class Bench:
    """A consortium of phantom hospitals under ``root``, and the attacking server's keys.

    ``backbone``: what the hospitals embed with (the attacker uses the same public backbone); ``floor``: node-config
    keys every hospital has (the privacy officer's own floor, under which the attacks run; a scenario may add more).
    """

    root: Path
    backbone: str
    floor: dict[str, Any] = field(default_factory=dict)
    hospitals: list[Hospital] = field(default_factory=list)
    signing_key: Ed25519PrivateKey | None = None
    public_key: Path | None = None
    roster: Path | None = None
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def build(cls, root: Path, backbone: str, hospitals: int, images: int, size: int = 64, seed: int = 0) -> Bench:
        """Keys, roster and ``hospitals`` phantom hospitals of ``images`` images each, embedded once."""
        from deploy.certs import make_hospital_keys
        from research.phantom import write_phantom
        from shared.identity import Roster

        root = Path(root)
        private, public = generate_keys(root / "consortium", force=True)
        bench = cls(root, backbone, signing_key=load_private_key(private), public_key=public)
        identities = {}
        for k in range(hospitals):
            folder = root / f"hospital-{k}"
            keys = make_hospital_keys(folder / "keys", f"hospital-{k}", force=True)
            identities[f"hospital-{k}"] = keys.public_key
            if not (folder / "data" / "manifest.csv").exists():
                write_phantom(folder / "data", n=images, hospital=k, seed=seed, size=size)
            bench.hospitals.append(Hospital(k, f"hospital-{k}", folder, {
                "name": f"hospital-{k}", "manifest": str(folder / "data" / "manifest.csv"),
                "cache": str(root / "cache"), "backbone": backbone, "audit-log": str(folder / "state" / "audit.jsonl"),
                "privacy-ledger": str(folder / "state" / "privacy-ledger.json"),
                "consortium-key": str(public), "roster": str(root / "roster.json"),
                "secagg-key": str(keys.private_key)}))
        bench.roster = Roster.write(root / "roster.json", identities)
        return bench

    def reset(self, floor: dict[str, Any] | None = None) -> list[Hospital]:
        """Every hospital with a fresh state folder (audit log, ledgers, records), a fresh installed app and the
        node config of the scenario: the bench's floor plus the scenario's ``floor``."""
        from client.app import make_client_app

        for hospital in self.hospitals:
            state = hospital.folder / "state"
            for path in sorted(state.rglob("*"), reverse=True) if state.exists() else []:
                path.unlink() if path.is_file() else path.rmdir()
            hospital.node_config = {**hospital.base_config, **self.floor, **(floor or {})}
            hospital.app = make_client_app()
            hospital.context = None
        return self.hospitals

    # --- the attacking server ------------------------------------------------------------------------------------

    def message(self, hospital: Hospital, kind: str, content: RecordDict, run_id: int, server_round: int = 1
                ) -> Message:
        """A message of Flower run ``run_id`` to ``hospital``, as the SuperLink delivers it."""
        meta = Metadata(run_id=run_id, message_id=f"m-{next(self._ids)}-{uuid.uuid4().hex[:8]}",
                        src_node_id=SERVER_NODE, dst_node_id=hospital.node_id, reply_to_message_id="",
                        group_id=str(server_round), created_at=time.time(), ttl=600.0, message_type=kind)
        return Message(metadata=meta, content=content)

    def round_content(self, arrays: ArrayRecord, run_config: dict[str, Any], run_id: int, stage: int, round_: int,
                      kind: str) -> RecordDict:
        """Global adaptors and the round's config, signed with the consortium's key for exactly this run, stage,
        round and kind (the attacker holds the key: whatever it sends is "signed by the consortium")."""
        binding = RoundBinding(run_id, run_identity(run_config), stage, round_, kind)
        config = ConfigRecord({"stage": stage, "round": round_, ARRAYS_DIGEST: arrays_digest(arrays).hex(),
                               ARRAYS_SIGNATURE: sign_round(arrays, binding, self.signing_key)})
        return RecordDict({ARRAYS: arrays, CONFIG: config})

    def send(self, hospital: Hospital, kind: str, arrays: ArrayRecord, run_config: dict[str, Any], run_id: int,
             stage: int = 0, round_: int = 0) -> Message:
        """Send ``hospital`` a signed train or evaluate message and return its reply."""
        content = self.round_content(arrays, run_config, run_id, stage, round_, kind.split(".")[0])
        return hospital.handle(self.message(hospital, kind, content, run_id))

    def initial(self, run_config: dict[str, Any], embed_dim: int) -> ArrayRecord:
        """The run's round-1 adaptors, in its wire dtype."""
        from shared.model import federation_model

        config = FederationConfig.from_run_config(run_config)
        return encoded(to_record(federation_model(config, embed_dim, self.backbone)), config.wire_dtype)

    def grid(self, hospitals: Iterable[Hospital]) -> RedteamGrid:
        return RedteamGrid({h.node_id: h for h in hospitals})


class RedteamGrid:
    """What the server's code talks to (``push_messages``/``pull_messages``, as :class:`flwr.serverapp.Grid`),
    delivering each message to its hospital at once. ``tamper(message)`` may replace a message before delivery (None:
    it is never delivered)."""

    def __init__(self, hospitals: dict[int, Hospital]) -> None:
        self.hospitals = hospitals
        self.tamper = None
        self.received: list[tuple[str, int, Message]] = []
        self._outbox: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return sorted(self.hospitals)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each message (as ``tamper`` rewrites it) and keep the reply; returns the messages' ids."""
        ids = []
        for msg in messages:
            message_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = message_id
            ids.append(message_id)
            delivered = self.tamper(msg) if self.tamper is not None else msg
            if delivered is None:
                continue
            delivered.metadata.__dict__["_message_id"] = message_id  # a rewritten message answers as the original
            hospital = self.hospitals[msg.metadata.dst_node_id]
            reply = hospital.handle(delivered)
            self.received.append((msg.metadata.message_type, hospital.index, reply))
            self._outbox[message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._outbox.pop(i) for i in list(message_ids) if i in self._outbox]


@contextmanager
def server_identity(run_id: int) -> Iterator[None]:
    """Messages made by the server's own code need the identity Flower gives a ServerApp process."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SERVER_NODE, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def manifest_labels(hospital: Hospital) -> dict[str, dict[str, Any]]:
    """The ground truth: each image of the hospital's manifest with its split and labels."""
    import csv

    with open(hospital.node_config["manifest"], newline="") as f:
        return {row["image"]: row for row in csv.DictReader(f)}
