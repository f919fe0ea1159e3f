"""Code approval: a hospital runs only app versions its IT approved, and refuses any message before that.

The **code hash** covers what runs at the hospital: the ``client`` and ``shared`` packages as they are installed
(or, in a Flower deployment, as the SuperNode unpacked the FAB): every ``*.py`` and ``*.json`` file and every file
under an ``assets/`` folder (model configs, co-occurrence tables, shipped backbone artifacts), never
``__pycache__``. Per file ``sha256  relative/path`` (the ``sha256sum`` line), sorted by path; the code hash is the
sha256 of those lines, so IT can reproduce it without retune:

    cd SITE_PACKAGES && find client shared -type f \\( -name '*.py' -o -name '*.json' -o -path '*/assets/*' \\) \\
        -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum | sha256sum

Third-party packages (torch, flwr, ...) are pinned by ``pyproject.toml``, not covered here.

The approved list (``approved-apps`` in the node config) is a JSON file ``{"format": ..., "approved": [{code_hash,
approved_by, approved_at, note, files}]}``; ``files`` (path -> sha256, size) lets ``retune approve`` show what
changed since the last approval.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from client.audit import REFUSED, AuditLog, message_entry
from shared.errors import RetuneError

log = logging.getLogger(__name__)
PACKAGES = ("client", "shared")
LIST_FORMAT = "retune-approved-apps/1"
#: Node-config key naming the hospital's approved-apps list.
APPROVED_APPS_KEY = "approved-apps"


@dataclass(frozen=True)
class CodeFile:
    """One hashed file: path relative to the folder holding the packages, sha256, size in bytes."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class CodeManifest:
    """The files that would run at the hospital and their combined code hash."""

    files: tuple[CodeFile, ...]

    @property
    def code_hash(self) -> str:
        lines = "".join(f"{f.sha256}  {f.path}\n" for f in self.files)
        return hashlib.sha256(lines.encode()).hexdigest()

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {f.path: {"sha256": f.sha256, "size": f.size} for f in self.files}


def _hashed(path: Path) -> bool:
    return "__pycache__" not in path.parts and (path.suffix in (".py", ".json") or "assets" in path.parts)


def code_manifest(source: Path | None = None) -> CodeManifest:
    """The manifest of ``source/client`` and ``source/shared``, or (``None``) of the imported packages."""
    files = []
    for name in PACKAGES:
        root = Path(source) / name if source is not None else \
            Path(importlib.import_module(name).__file__ or "").resolve().parent
        if not root.is_dir():
            raise RetuneError(f"{root} does not exist: --source must be the folder holding client/ and shared/")
        for path in root.rglob("*"):
            rel = path.relative_to(root.parent)
            if path.is_file() and _hashed(rel):
                data = path.read_bytes()
                files.append(CodeFile(rel.as_posix(), hashlib.sha256(data).hexdigest(), len(data)))
    return CodeManifest(tuple(sorted(files, key=lambda f: f.path)))


@lru_cache(maxsize=1)
def running_code() -> CodeManifest:
    """The manifest of the code this process runs (hashed once per process: Python does not reload it)."""
    return code_manifest()


def read_approved(path: Path) -> list[dict[str, Any]]:
    """The approvals in a hospital's list (an empty list when the file does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        entries = data["approved"] if isinstance(data, dict) else data
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "code_hash" in e for e in entries):
            raise ValueError("expected {'approved': [{'code_hash': ...}, ...]}")
    except (ValueError, KeyError, OSError) as exc:
        raise RetuneError(f"approved-apps list {path} is not valid: {exc}") from None
    return entries


def find_approval(path: Path, code_hash: str) -> dict[str, Any] | None:
    """The approval of ``code_hash`` in the list, if any."""
    return next((e for e in read_approved(path) if e["code_hash"] == code_hash), None)


def add_approval(path: Path, manifest: CodeManifest, approved_by: str, note: str = "") -> dict[str, Any]:
    """Append an approval of ``manifest`` to the list (atomic rewrite); returns the new entry."""
    path = Path(path)
    entries = read_approved(path)
    entry = {"code_hash": manifest.code_hash, "approved_by": approved_by,
             "approved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "note": note,
             "files": manifest.as_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"format": LIST_FORMAT, "approved": [*entries, entry]}, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return entry


@dataclass(frozen=True)
class CodeDiff:
    """Files added, removed and changed between an approved manifest and the current one."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]


def diff_manifest(approved_files: dict[str, dict[str, Any]], manifest: CodeManifest) -> CodeDiff:
    """What changed since an approval whose ``files`` were stored."""
    now = manifest.as_dict()
    return CodeDiff(tuple(sorted(set(now) - set(approved_files))), tuple(sorted(set(approved_files) - set(now))),
                    tuple(sorted(p for p in set(now) & set(approved_files)
                                 if now[p]["sha256"] != approved_files[p].get("sha256"))))


def approval_mod(approved_path: Path | str | None = None, audit_path: Path | str | None = None,
                 manifest: CodeManifest | None = None) -> Mod:
    """A client mod that answers every message with an error, before the app (and any data) is reached,
    unless the running code's hash is in the approved list.

    ``approved_path`` None: the list named by the node config's ``approved-apps``; no list configured at all means
    approval is not in force at this hospital (every message passes). ``audit_path``: write a ``refused`` entry
    there (leave None under :func:`client.guard.boundary_guard`, which audits every reply). ``manifest``: the
    code to check (default: :func:`running_code`).
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        configured = approved_path or context.node_config.get(APPROVED_APPS_KEY)
        if not configured:
            return call_next(msg, context)
        code = manifest or running_code()
        reason = (f"app code {code.code_hash[:16]} is not approved at this hospital; "
                  "its IT approves a version with `retune approve`")
        try:
            if find_approval(Path(str(configured)), code.code_hash) is not None:
                return call_next(msg, context)
            detail = reason
        except RetuneError as exc:  # the path stays at the hospital: the server only learns "not approved"
            detail = f"{reason} ({exc})"
        log.warning("refused a %s message: %s", msg.metadata.message_type, detail)
        if audit_path is not None:
            AuditLog(audit_path).append(message_entry(REFUSED, msg, reason=detail, code_hash=code.code_hash))
        return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, reason), reply_to=msg)

    return mod
