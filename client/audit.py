"""The hospital's audit log: one JSON line per reply that left (or was refused), hash-chained, append-only.

Each entry says what crossed the boundary: run, message type, stage/round, record keys, array names/shapes/dtypes
(not their values), the scalar metrics with their values (an evaluation's released figures among them), byte
count and :func:`content_sha256` of the outgoing content. Each entry
holds ``prev`` (the previous entry's ``hash``, :data:`GENESIS` for the first) and ``hash`` =
sha256 of the entry's canonical JSON (sorted keys, no spaces, ASCII) without ``hash``. Changing, deleting or
reordering a line breaks the chain at that line (:func:`verify_log`); cutting lines off the end does not, so keep
the head hash ``retune audit verify`` prints somewhere else and pass it back with ``--head``.

Appends take an exclusive ``fcntl`` lock on the log, so SuperNode processes can share one, and are fsync'ed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from shared.errors import RetuneError

GENESIS = "0" * 64
#: Node-config key of the audit log; the hospital's other records (evaluations released, secure-aggregation
#: contributions, rounds served) are kept in the same folder (:func:`beside_audit_log`).
AUDIT_LOG_KEY = "audit-log"
#: Events: a conforming reply left; a reply was refused and replaced by an error; an error reply left.
SENT, REFUSED, ERROR = "sent", "refused", "error"


class AuditError(RetuneError):
    """The audit log cannot be appended to (unreadable, or its last line is damaged)."""


@dataclass(frozen=True)
class AuditReport:
    """What :func:`verify_log` found: ``bad_line`` (1-based) and ``problem`` are set when the chain breaks."""

    entries: int
    head: str
    bad_line: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.bad_line is None


def canonical_json(entry: dict[str, Any]) -> bytes:
    """The bytes an entry's hash covers."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    """sha256 of the entry's canonical JSON without its ``hash`` field."""
    return hashlib.sha256(canonical_json({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def content_sha256(content: RecordDict) -> str:
    """sha256 of what a reply carries: per record (name order) its name, then per array (name order) name,
    dtype, shape and serialised bytes, per metric (key order) key and JSON value; each part length-prefixed."""
    h = hashlib.sha256(b"retune-fl/content/v1\n")

    def part(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "big") + data)

    for record_name in sorted(content.keys()):
        record = content[record_name]
        part(f"{type(record).__name__}:{record_name}".encode())
        for key in sorted(record.keys()):
            value = record[key]
            part(key.encode())
            if isinstance(record, ArrayRecord):
                part(json.dumps([value.dtype, list(value.shape), value.stype]).encode())
                part(bytes(value.data))
            else:
                part(value if isinstance(value, bytes) else json.dumps(value, default=_jsonable).encode())
    return h.hexdigest()


def _jsonable(value: Any) -> str:
    return value.hex() if isinstance(value, bytes) else repr(value)


def describe_content(content: RecordDict) -> dict[str, Any]:
    """Record keys, array names/shapes/dtypes, metric keys and values, and byte count of a reply's content."""
    arrays: dict[str, dict[str, Any]] = {}
    metric_keys: list[str] = []
    metric_values: dict[str, Any] = {}
    size = 0
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            for key, array in record.items():
                arrays[f"{name}/{key}" if name != "arrays" else key] = {"shape": list(array.shape),
                                                                        "dtype": array.dtype}
                size += len(array.data)
        elif isinstance(record, MetricRecord):
            metric_keys += sorted(record.keys()) if name == "metrics" else [f"{name}/{k}" for k in record.keys()]
            metric_values.update({k if name == "metrics" else f"{name}/{k}": v for k, v in record.items()})
            size += record.count_bytes()
        else:
            size += record.count_bytes()
    return {"records": sorted(content.keys()), "arrays": arrays, "metric_keys": sorted(metric_keys),
            "metric_values": metric_values, "bytes": size, "sha256": content_sha256(content)}


def message_entry(event: str, msg: Message, content: RecordDict | None = None, **extra: Any) -> dict[str, Any]:
    """An audit entry for a reply to ``msg``; ``content`` is what was sent (or refused), None for errors."""
    meta = msg.metadata
    entry: dict[str, Any] = {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "event": event, "run_id": meta.run_id, "node_id": meta.dst_node_id, "message_id": meta.message_id,
        "message_type": meta.message_type,
        "server_round": int(meta.group_id) if meta.group_id.isdigit() else meta.group_id,
    }
    config = msg.content.get("config") if msg.has_content() else None
    if isinstance(config, ConfigRecord):
        entry.update({k: config[k] for k in ("stage", "round") if isinstance(config.get(k), int)})
    if content is not None:
        entry.update(describe_content(content))
    entry.update({k: v for k, v in extra.items() if v is not None})
    return entry


def beside_audit_log(node_config: Mapping[str, Any], name: str) -> Path | None:
    """Where the hospital keeps its record ``name``: beside its audit log (None: no audit log configured)."""
    audit = node_config.get(AUDIT_LOG_KEY)
    return Path(str(audit)).parent / name if audit else None


@contextmanager
def held_records(node_config: Mapping[str, Any], name: str, state: RecordDict) -> Iterator[list[dict[str, Any]]]:
    """The entries of the hospital's JSONL record ``name`` (beside its audit log), held under an exclusive lock
    from reading to writing: entries the caller appends to the list are written (and fsync'ed) on a normal exit,
    nothing on an exception. A hospital without an audit log keeps the record in the run's ``state``."""
    path = beside_audit_log(node_config, name)
    if path is None:
        record = state.get(name)
        entries = [json.loads(e) for e in record["entries"]] if isinstance(record, ConfigRecord) else []
        yield entries
        state[name] = ConfigRecord({"entries": [json.dumps(e, sort_keys=True) for e in entries]})
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            entries = [json.loads(line) for line in f.read().splitlines() if line.strip()]
            known = len(entries)
            yield entries
            for entry in entries[known:]:
                f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class AuditLog:
    """An append-only, hash-chained JSONL file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Chain ``entry`` to the last line under an exclusive lock, write it and fsync; returns it with
        ``prev`` and ``hash``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise AuditError(f"cannot open the audit log {self.path}: {exc.strerror}") from None
        with os.fdopen(fd, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                last, lead = _last_line(f), b""
                if last is None:
                    prev = GENESIS
                else:
                    f.seek(-1, os.SEEK_END)
                    lead = b"" if f.read(1) == b"\n" else b"\n"  # a whole last entry without its newline
                    try:
                        prev = json.loads(last)["hash"]
                    except (ValueError, KeyError, TypeError):
                        raise AuditError(f"the last line of the audit log {self.path} is damaged; run "
                                         f"`retune audit verify {self.path}`") from None
                chained = {**{k: v for k, v in entry.items() if k not in ("prev", "hash")}, "prev": prev}
                chained["hash"] = entry_hash(chained)
                f.write(lead + canonical_json(chained) + b"\n")
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return chained

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, oldest first (no verification; see :func:`verify_log`)."""
        return [json.loads(line) for line in self.path.read_bytes().splitlines() if line.strip()]


def verify_log(path: Path | str, head: str | None = None) -> AuditReport:
    """Check every line's hash and its link to the previous one, from :data:`GENESIS`; ``head``, if given, must
    be the last entry's hash (detects lines cut off the end)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # no half-written line from a concurrent append
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        raise RetuneError(f"audit log {path} does not exist") from None
    except OSError as exc:
        raise RetuneError(f"cannot read audit log {path}: {exc.strerror}") from None
    if lines and lines[-1] == b"":
        lines.pop()
    prev, count = GENESIS, 0
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            return AuditReport(count, prev, number, f"not a JSON entry ({exc})")
        if not isinstance(entry.get("hash"), str) or "prev" not in entry:
            return AuditReport(count, prev, number, "entry has no hash/prev")
        if entry_hash(entry) != entry["hash"]:
            return AuditReport(count, prev, number, "entry was changed: its content does not match its hash")
        if entry["prev"] != prev:
            where = "the first entry does not start from genesis" if number == 1 else \
                "its prev is not the previous line's hash: a line before it was deleted, inserted or moved"
            return AuditReport(count, prev, number, where)
        prev, count = entry["hash"], count + 1
    if head is not None and head != prev:
        return AuditReport(count, prev, count + 1, f"the log ends at {prev[:16]}…, not at the expected head "
                                                   f"{head[:16]}…: entries were cut off the end")
    return AuditReport(count, prev)


def _last_line(f: Any) -> bytes | None:
    """The last non-empty line of an open binary file, reading backwards in blocks."""
    end = f.seek(0, os.SEEK_END)
    block, data, pos = 4096, b"", end
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        data = f.read(step) + data
        stripped = data.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rsplit(b"\n", 1)[1]
    stripped = data.rstrip(b"\n")
    return stripped or None
