"""Approval of app packages: a hospital serves only runs whose app package (FAB) its IT approved, by hash.

What runs at the hospital is the installed retune-fl (:mod:`client.runtime` never unpacks or imports a run's
package); approving a package is the hospital's consent to take part in runs of that app version: its server code,
its default run configuration, the hospital code it was built against. IT reviews it with ``retune approve``,
which lists the package's files, what changed since the last approval, and whether its ``client/`` and ``shared/``
match the installed runtime.

- The package hash, the approved list (node config ``approved-apps``) and the ``pending/`` folder of refused
  packages: :mod:`shared.app_packages`.
- The **installed runtime** (:func:`code_manifest`): the ``client`` and ``shared`` packages as installed, every
  ``*.py`` and ``*.json`` file and every file under an ``assets/`` folder; its code hash is recorded in every
  audit entry, and IT can reproduce it without retune::

    cd SITE_PACKAGES && find client shared -type f \\( -name '*.py' -o -name '*.json' -o -path '*/assets/*' \\) \\
        -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum | sha256sum
"""

from __future__ import annotations

import hashlib
import importlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from shared.app_packages import AppPackage, CodeDiff, CodeFile, CodeManifest, diff_files
from shared.errors import RetuneError

PACKAGES = ("client", "shared")
#: Node-config key naming the hospital's approved-apps list.
APPROVED_APPS_KEY = "approved-apps"


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


def hospital_code_diff(package: AppPackage, installed: CodeManifest | None = None) -> CodeDiff:
    """How the package's ``client/`` and ``shared/`` differ from the installed runtime (sources and configs;
    shipped weights do not travel in a package)."""
    installed = installed or running_code()

    def code(files: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {p: f for p, f in files.items()
                if p.split("/")[0] in PACKAGES and p.endswith((".py", ".json")) and "__pycache__" not in p}

    return diff_files(code(installed.as_dict()), code(package.manifest.as_dict()))
