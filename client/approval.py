"""Approval of app packages: a hospital serves only runs whose app package (FAB) its IT approved, by hash.

What runs at the hospital is the installed retune-fl (:mod:`client.runtime` never unpacks or imports a run's
package); approving a package is the hospital's consent to take part in runs of that app version: its server code,
its default run configuration, the hospital code it was built against. IT reviews it with ``retune approve``,
which lists the package's files, what changed since the last approval, and whether its ``client/`` and ``shared/``
match the installed runtime.

- The **package hash** is the sha256 of the FAB file, as Flower computes it (``flwr build`` names the file after
  it); ``sha256sum`` reproduces it.
- The **approved list** (node config ``approved-apps``) is a JSON file ``{"format": ..., "approved": [{fab_hash,
  app, approved_by, approved_at, note, files}]}``; ``files`` (path -> sha256, size) lets ``retune approve`` show
  what changed since.
- A refused package is kept in ``pending/<hash>.fab`` beside the list, for IT to review.
- The **installed runtime** (:func:`code_manifest`): the ``client`` and ``shared`` packages as installed, every
  ``*.py`` and ``*.json`` file and every file under an ``assets/`` folder; its code hash is recorded in every
  audit entry, and IT can reproduce it without retune::

    cd SITE_PACKAGES && find client shared -type f \\( -name '*.py' -o -name '*.json' -o -path '*/assets/*' \\) \\
        -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum | sha256sum
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from shared.errors import RetuneError

PACKAGES = ("client", "shared")
LIST_FORMAT = "retune-approved-apps/2"
#: Node-config key naming the hospital's approved-apps list.
APPROVED_APPS_KEY = "approved-apps"
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


def _hashed(path: Path) -> bool:
    return "__pycache__" not in path.parts and (path.suffix in (".py", ".json") or "assets" in path.parts)


def code_manifest(source: Path | None = None) -> CodeManifest:
    """The manifest of ``source/client`` and ``source/shared``, or (``None``) of the installed packages."""
    files = []
    for name in PACKAGES:
        root = Path(source) / name if source is not None else \
            Path(importlib.import_module(name).__file__ or "").resolve().parent
        if not root.is_dir():
            raise RetuneError(f"{root} does not exist: the folder must hold client/ and shared/")
        for path in root.rglob("*"):
            rel = path.relative_to(root.parent)
            if path.is_file() and _hashed(rel):
                data = path.read_bytes()
                files.append(CodeFile(rel.as_posix(), hashlib.sha256(data).hexdigest(), len(data)))
    return CodeManifest(tuple(sorted(files, key=lambda f: f.path)))


@lru_cache(maxsize=1)
def running_code() -> CodeManifest:
    """The manifest of the hospital runtime this process runs (hashed once: Python does not reload it)."""
    return code_manifest()


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


def hospital_code_diff(package: AppPackage, installed: CodeManifest | None = None) -> CodeDiff:
    """How the package's ``client/`` and ``shared/`` differ from the installed runtime (sources and configs;
    shipped weights do not travel in a package)."""
    installed = installed or running_code()

    def code(files: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {p: f for p, f in files.items()
                if p.split("/")[0] in PACKAGES and p.endswith((".py", ".json")) and "__pycache__" not in p}

    return diff_files(code(installed.as_dict()), code(package.manifest.as_dict()))


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
