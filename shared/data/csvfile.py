"""Read label CSVs strictly: UTF-8 text, every column named once, and only an empty cell is a missing value.

pandas would read ``NaN``, ``NA``, ``null`` or ``None`` in a label cell as blank, rename a second ``Edema`` column
to ``Edema.1`` and report a non-UTF-8 byte at a position inside its read buffer; here the first two stay text (so
the label parser names the row and column) or are an error, and the third names the byte's place in the file.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from shared.data.names import disease_key
from shared.errors import RetuneError


def read_csv(path: Path, text: Sequence[str] = (), nrows: int | None = None) -> pd.DataFrame:
    """Read a CSV (or .csv.gz) with the ``text`` columns as strings; a bad file is a RetuneError."""
    try:
        df = pd.read_csv(path, dtype={c: str for c in text}, nrows=nrows, skipinitialspace=True,
                         keep_default_na=False, na_values=[""])
        first = pd.read_csv(path, header=None, nrows=1, dtype=str, skipinitialspace=True, na_filter=False)
    except UnicodeDecodeError as e:
        raise RetuneError(_not_utf8(path, e)) from e
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, EOFError) as e:
        raise RetuneError(f"cannot read {path} as CSV ({e}): is it a comma-separated label file?") from e
    _refuse_repeated_columns(first.iloc[0].tolist() if len(first) else [], path)
    df.columns = [str(c).strip() for c in df.columns]
    return df


def header(path: Path) -> list[str]:
    """The column names of a CSV."""
    return list(read_csv(path, nrows=0).columns)


def _refuse_repeated_columns(names: list[str], path: Path) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        key = disease_key(name)
        if key and key in seen:
            raise RetuneError(f"{path}: column {name.strip()!r} appears twice in the header (columns "
                              f"{seen[key] + 1} and {i + 1}): keep one")
        seen.setdefault(key, i)


def _not_utf8(path: Path, error: UnicodeDecodeError) -> str:
    """The message for a file that is not UTF-8, naming the first bad byte's offset and line."""
    with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        at, line = e.start, raw.count(b"\n", 0, e.start) + 1
        return (f"{path} is not UTF-8 text: byte 0x{raw[at]:02x} at byte offset {at} (line {line}) cannot be "
                "decoded; save the file as UTF-8 (e.g. Excel's 'CSV UTF-8')")
    return f"{path} is not UTF-8 text ({error}); save the file as UTF-8"
