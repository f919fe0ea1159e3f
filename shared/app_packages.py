"""App packages (FABs) and the lists of approved ones: what a hospital, and the consortium's server runtime, read
before they serve a run.

- The **package hash** is the sha256 of the FAB file, as Flower computes it (``flwr build`` names the file after
  it); ``sha256sum`` reproduces it. :class:`AppPackage` reads a package's files and default run config without
  unpacking it to disk or importing anything from it.
- An **approved list** is a JSON file ``{"format": ..., "approved": [{fab_hash, app, approved_by, approved_at, note,
  files}]}`` (a hospital's node config ``approved-apps``; the server runtime's ``--approved-apps``); ``files``
  (path -> sha256, size) lets ``retune approve`` show what changed since.
- A refused package is kept in ``pending/<hash>.fab`` beside the list, for review.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shared.errors import RetuneError

LIST_FORMAT = "retune-approved-apps/2"
PENDING_DIR = "pending"
#: Bounds on a package read for review (Flower's own FAB limit is 10 MB).
MAX_PACKAGE_BYTES = 64 * 1024 * 1024
MAX_PACKAGE_FILES = 10_000


@dataclass(frozen=True)
class CodeFile:
    """One hashed file: path relative to the folder holding the packages, sha256, size in bytes."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class CodeManifest:
    """A set of files and their combined hash (sha256 of their ``sha256sum`` lines, sorted by path)."""

    files: tuple[CodeFile, ...]

    @property
    def code_hash(self) -> str:
        lines = "".join(f"{f.sha256}  {f.path}\n" for f in self.files)
        return hashlib.sha256(lines.encode()).hexdigest()

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {f.path: {"sha256": f.sha256, "size": f.size} for f in self.files}


@dataclass(frozen=True)
class AppPackage:
    """A run's app package (FAB) as read for review: its hash, identity, default run config and files."""

    fab_hash: str
    app: str
    run_config: dict[str, Any]
    manifest: CodeManifest

    @classmethod
    def read(cls, data: bytes) -> AppPackage:
        """Read a FAB's bytes without unpacking it to disk or importing anything from it."""
        if len(data) > MAX_PACKAGE_BYTES:
            raise RetuneError(f"the app package is {len(data)} bytes, more than {MAX_PACKAGE_BYTES}: refused")
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
            infos = [i for i in archive.infolist() if not i.is_dir()]
            if len(infos) > MAX_PACKAGE_FILES or sum(i.file_size for i in infos) > MAX_PACKAGE_BYTES:
                raise RetuneError("the app package unpacks to too many files or bytes: refused")
            files = []
            for info in infos:
                name = info.filename
                if name.startswith("/") or ".." in Path(name).parts:
                    raise RetuneError(f"the app package holds a path outside itself ({name!r}): refused")
                content = archive.read(info)
                files.append(CodeFile(name, hashlib.sha256(content).hexdigest(), len(content)))
            pyproject = tomllib.loads(archive.read("pyproject.toml").decode())
        except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError, OSError) as exc:
            raise RetuneError(f"not a Flower app package (FAB): {exc}") from None
        project, flwr_app = pyproject.get("project", {}), pyproject.get("tool", {}).get("flwr", {}).get("app", {})
        app = f"{flwr_app.get('publisher', '?')}/{project.get('name', '?')} {project.get('version', '?')}"
        return cls(hashlib.sha256(data).hexdigest(), app, dict(flwr_app.get("config", {})),
                   CodeManifest(tuple(sorted(files, key=lambda f: f.path))))

    @classmethod
    def from_file(cls, path: Path) -> AppPackage:
        try:
            return cls.read(Path(path).read_bytes())
        except OSError as exc:
            raise RetuneError(f"cannot read the app package {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class CodeDiff:
    """Files added, removed and changed between two file lists."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def diff_files(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> CodeDiff:
    """What changed from the file list ``before`` to ``after`` (path -> {sha256, size})."""
    return CodeDiff(tuple(sorted(set(after) - set(before))), tuple(sorted(set(before) - set(after))),
                    tuple(sorted(p for p in set(after) & set(before)
                                 if after[p].get("sha256") != before[p].get("sha256"))))


def read_approved(path: Path) -> list[dict[str, Any]]:
    """The approvals in a hospital's list (an empty list when the file does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        entries = data.get("approved") if isinstance(data, dict) else None
        if data.get("format") != LIST_FORMAT or not isinstance(entries, list) or \
                not all(isinstance(e, dict) and isinstance(e.get("fab_hash"), str) for e in entries):
            raise ValueError(f"expected {{'format': {LIST_FORMAT!r}, 'approved': [{{'fab_hash': ...}}, ...]}}")
    except (ValueError, AttributeError, OSError) as exc:
        raise RetuneError(f"approved-apps list {path} is not valid: {exc}") from None
    return entries


def find_approval(path: Path, fab_hash: str) -> dict[str, Any] | None:
    """The approval of ``fab_hash`` in the list, if any."""
    return next((e for e in read_approved(path) if e["fab_hash"] == fab_hash), None)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def add_approval(path: Path, package: AppPackage, approved_by: str, note: str = "") -> dict[str, Any]:
    """Append an approval of ``package`` to the list (atomic rewrite); returns the new entry."""
    path = Path(path)
    entries = read_approved(path)
    entry = {"fab_hash": package.fab_hash, "app": package.app, "approved_by": approved_by,
             "approved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "note": note,
             "files": package.manifest.as_dict()}
    _atomic_write(path, (json.dumps({"format": LIST_FORMAT, "approved": [*entries, entry]}, indent=2) + "\n").encode())
    return entry


def pending_path(approved_list: Path, fab_hash: str) -> Path:
    """Where a refused package with this hash is kept for review."""
    return Path(approved_list).parent / PENDING_DIR / f"{fab_hash}.fab"


def store_pending(approved_list: Path, content: bytes, fab_hash: str) -> Path:
    """Keep a refused package for review (once per hash); returns its path."""
    path = pending_path(approved_list, fab_hash)
    if not path.exists() and len(content) <= MAX_PACKAGE_BYTES:
        _atomic_write(path, content)
    return path


def package_problem(approved_list: Path, fab_hash: str, content: bytes) -> str | None:
    """Why a run's app package may not be served (None: ``content`` hashes to ``fab_hash``, which is in the approved
    list); a refused package is kept for review beside the list (:func:`store_pending`)."""
    if hashlib.sha256(content).hexdigest() != fab_hash:
        return f"the app package's content does not match its hash {fab_hash[:16]}"
    if find_approval(approved_list, fab_hash) is None:
        return f"app package {fab_hash} is not in {approved_list}; kept for review at " \
               f"{store_pending(approved_list, content, fab_hash)}"
    return None
