"""Keep a label file's image references inside the hospital's data folder.

A row such as ``../../etc/passwd``, ``/home/someone/x.png`` or a symlink that leads out of the folder would make
the hospital read (and embed) a file it never meant to share with a training run. Such references are refused
unless the hospital allows them (``allow_outside_paths``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from shared.errors import RetuneError


def refuse_outside(refs: Iterable[str], root: Path, source: Path) -> None:
    """Raise when an image reference (the file part of ``PATH.npz::KEY::I`` too) resolves, symlinks followed,
    outside ``root``."""
    inside = str(root.resolve())
    prefix = inside.rstrip(os.sep) + os.sep
    resolve = _Resolver()
    outside = [(ref, real) for ref in refs
               if (real := resolve(os.path.join(inside, ref.partition("::")[0]))) != inside
               and not real.startswith(prefix)]
    if outside:
        ref, real = outside[0]
        shown = ref if ref.partition("::")[0] == real else f"{ref} -> {real}"
        raise RetuneError(f"{source}: {len(outside)} image path(s) lead outside the data folder {inside}, e.g. "
                          f"{shown}; refused: point the image root at a folder that holds every image, or allow "
                          "reading outside it (data check --allow-outside-paths, node config allow-outside-paths)")


class _Resolver:
    """``os.path.realpath`` of many absolute paths that share folders, each folder looked at once."""

    def __init__(self) -> None:
        self._folders: dict[str, tuple[str, bool]] = {}

    def __call__(self, path: str) -> str:
        return self._resolve(path)[0]

    def _resolve(self, path: str) -> tuple[str, bool]:
        """(real path, whether it exists); folders are memoised, files (seen once each) are not."""
        parent, name = os.path.split(path)
        if parent == path:  # the file-system root
            return path, True
        base, exists = self._folders.get(parent) or self._folder(parent)
        if name in ("", "."):
            return base, exists
        if name == "..":
            return os.path.dirname(base), exists
        joined = base + name if base.endswith(os.sep) else base + os.sep + name
        return _follow(joined) if exists else (joined, False)

    def _folder(self, path: str) -> tuple[str, bool]:
        self._folders[path] = self._resolve(path)
        return self._folders[path]


def _follow(path: str) -> tuple[str, bool]:
    """``path`` (its folder already real) with a final symlink followed, and whether it exists."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return path, False
    return (os.path.realpath(path) if stat.S_ISLNK(mode) else path), True
