"""Disease names as label files and site settings spell them, and the misspellings that must not pass silently.

Names match ignoring case, ``_`` and surrounding spaces (``Pleural_Effusion`` = ``pleural effusion``), and NIH's
``Effusion`` = CheXpert's ``Pleural Effusion``. A label-file column that is not a known disease but is spelled
almost like one (``Cardiomegally``) is an error rather than a disease of its own that no federation shares.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

from shared.errors import RetuneError
from shared.labels import CHEXPERT14, NIH14

#: Every disease of a built-in schema, plus CheXpert's and NIH's ``No Finding``.
KNOWN_DISEASES: tuple[str, ...] = tuple(dict.fromkeys((*CHEXPERT14, *NIH14)))
ALIASES = {"pleural effusion": "effusion", "effusion": "pleural effusion"}
#: How alike (difflib ratio) an unknown column must be to a known disease to count as its misspelling: it
#: catches ``Cardiomegally`` (0.96) and ``Edma`` (0.89), not ``Finding`` (0.82 to ``No Finding``).
TYPO_CUTOFF = 0.85


def disease_key(name: str) -> str:
    """The form names are compared in: lower case, ``_`` as space, no surrounding spaces."""
    return name.strip().lower().replace("_", " ")


def closest(name: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The candidate spelled most like ``name`` (compared by :func:`disease_key`), or None below ``cutoff``."""
    by_key = {disease_key(c): c for c in candidates}
    match = difflib.get_close_matches(disease_key(name), list(by_key), n=1, cutoff=cutoff)
    return by_key[match[0]] if match else None


def did_you_mean(name: str, candidates: Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'X'?)`` for the closest candidate, or ``""`` when none is close."""
    match = closest(name, candidates, cutoff)
    return f" (did you mean {match!r}?)" if match else ""


def refuse_misspelled_columns(columns: Iterable[str], requested: Iterable[str], path: Path,
                              what: str = "disease column") -> None:
    """Raise for a column that is neither a known disease nor ``requested`` but is spelled almost like one."""
    known = {disease_key(d) for d in (*KNOWN_DISEASES, *requested)}
    known |= {ALIASES[k] for k in known if k in ALIASES}
    for column in columns:
        if disease_key(column) in known:
            continue
        match = closest(column, KNOWN_DISEASES, TYPO_CUTOFF)
        if match is not None:
            raise RetuneError(f"{path}: unknown {what} {column!r} (did you mean {match!r}?): correct its spelling, "
                              "or name it with --diseases if it is a disease of its own")
