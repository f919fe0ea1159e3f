"""Read chest X-ray label files into a :class:`LabelTable`: one row per image, one float column per disease.

Formats: ``chexpert`` (CheXpert CSV), ``nih`` (NIH ChestX-ray14 ``Data_Entry_2017.csv``), ``mimic``
(MIMIC-CXR-JPG ``mimic-cxr-2.0.0-chexpert.csv`` / negbio), ``chestmnist`` (MedMNIST ``.npz``) and ``manifest``
(any CSV with an ``image``/``path`` column). ``.csv.gz`` files are read directly.

Raw label values are 1 (positive), 0 (negative), -1 (uncertain) or blank. The ``uncertain`` policy maps them:

=========  ====  ====  ====  =====
policy      1     0    -1    blank
=========  ====  ====  ====  =====
ignore      1     0    NaN   NaN
ones        1     0     1     0
zeros       1     0     0     0
=========  ====  ====  ====  =====

NaN means "not labelled" and is masked out of the loss. Blank becomes 0 under ``ones``/``zeros`` by the CheXpert
convention: an observation the report does not mention is taken as absent.

Label cells are read strictly: only an empty cell is blank (``NaN`` or ``NA`` in a label column is an error, not
a blank), a column may appear once in the header, and a column spelled almost like a known disease
(``Cardiomegally``) is an error naming the disease it resembles (see :mod:`shared.data.names`). Image references
must stay inside the image root unless ``allow_outside_paths`` (see :mod:`shared.data.paths`).

Rows without an official split are split 80/10/10 train/val/test by a SHA-1 hash of the patient id (or of the
image reference as written in the file, when there is no patient), so the split never depends on where the
images live and a patient's images never straddle splits.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, NamedTuple, Sequence, get_args

import numpy as np
import pandas as pd

from shared.data.csvfile import header, read_csv
from shared.data.names import ALIASES, did_you_mean, disease_key, refuse_misspelled_columns
from shared.data.paths import refuse_outside
from shared.errors import RetuneError
from shared.labels import CHEXPERT5, CHEXPERT14, NIH14, resolve_schema

Uncertain = Literal["ignore", "ones", "zeros"]
FORMATS = ("chexpert", "nih", "mimic", "chestmnist", "manifest")
SPLITS = ("train", "val", "test")
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "validate": "val", "test": "test", "testing": "test"}
_CHEXPERT_META = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
_MIMIC_IDS = ("subject_id", "study_id")
_MANIFEST_META = {"image", "path", "split", "patient", "hospital", "sex", "age", "view", "frontal/lateral", "ap/pa",
                  "viewposition", "view position", "subject_id", "study_id", "dicom_id", "patient id", "patient_id"}
_EXPECTED = {
    "chexpert": "Path, Sex, Age, Frontal/Lateral, AP/PA and observation columns such as " + ", ".join(CHEXPERT5),
    "nih": "Image Index, Finding Labels (pipe-separated), Patient ID",
    "mimic": "subject_id, study_id and the 14 CheXpert label columns",
    "chestmnist": "npz keys train_images, train_labels, val_*, test_* (labels N x 14 in NIH14 order)",
    "manifest": "image (or path), optional split, patient, hospital, then one 1/0/-1/blank column per disease",
}


@dataclass
class LabelTable:
    """Labels of one dataset. ``frame``: image, split, [patient], [hospital], then diseases after the uncertain
    policy (1.0 / 0.0 / NaN); ``raw``: the same disease columns before the policy (1, 0, -1, NaN)."""

    frame: pd.DataFrame
    diseases: tuple[str, ...]
    format: str
    source: str
    raw: pd.DataFrame
    notes: tuple[str, ...] = ()

    def labels(self) -> np.ndarray:
        """Labels as float32 ``[N, C]`` in ``diseases`` order; NaN = not labelled."""
        return self.frame[list(self.diseases)].to_numpy(dtype=np.float32)

    def __len__(self) -> int:
        return len(self.frame)


class _Parts(NamedTuple):
    meta: pd.DataFrame  # image, split, optional patient / hospital
    values: pd.DataFrame  # every available disease column, unparsed
    default: tuple[str, ...]
    notes: tuple[str, ...] = ()


def read_labels(path: str | os.PathLike, format: str = "auto", diseases: str | Sequence[str] | None = None,
                uncertain: Uncertain = "ignore", image_root: str | os.PathLike | None = None,
                metadata: str | os.PathLike | None = None, allow_outside_paths: bool = False,
                keep: Sequence[str] = ()) -> LabelTable:
    """Read a label file. ``diseases`` (schema name, comma list or list) selects and orders the disease columns;
    ``image_root`` defaults to the label file's folder; ``metadata`` is MIMIC's metadata CSV; image references
    that lead outside the image root are refused unless ``allow_outside_paths``; ``keep`` names columns of a CSV
    read row for row (manifest, chexpert, nih) to keep in the frame as text, never as diseases (a site, a scanner)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RetuneError(f"label file {path} not found: check the path")
    if uncertain not in get_args(Uncertain):
        raise RetuneError(f"unknown uncertain policy {uncertain!r}: use one of {', '.join(get_args(Uncertain))}")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in FORMATS:
        raise RetuneError(f"unknown label format {format!r}: use auto or one of {', '.join(FORMATS)}")
    root = Path(image_root).expanduser().resolve() if image_root else path.resolve().parent
    parts = _keep_columns(_READERS[fmt](path, root, Path(metadata).expanduser() if metadata else None), path, fmt,
                          keep)
    if parts.meta.empty:
        raise RetuneError(f"{path} has no rows: it holds no labelled images")
    requested = resolve_schema(diseases).diseases if diseases is not None else ()
    refuse_misspelled_columns(parts.values.columns, requested, path)
    if fmt != "chestmnist" and not allow_outside_paths:  # a ChestMNIST archive holds its own images
        refuse_outside(parts.meta["image"], root, path)
    names, columns = _select(requested or parts.default, tuple(parts.values.columns), path)
    raw = _parse_values(parts.values[list(columns)], names, path).set_axis(parts.meta.index)
    frame = pd.concat([parts.meta, apply_uncertain(raw, uncertain)], axis=1)
    return LabelTable(frame, names, fmt, str(path), raw, parts.notes)


def _keep_columns(parts: _Parts, path: Path, fmt: str, keep: Sequence[str]) -> _Parts:
    """``parts`` with each ``keep`` column of the file in its meta (absent columns are left for the caller to name)."""
    wanted = [c for c in keep if c not in parts.meta]
    if not wanted:
        return parts
    if fmt not in ("manifest", "chexpert", "nih"):
        raise RetuneError(f"{path}: a {fmt} label file is not read row for row, so its column(s) {', '.join(wanted)} "
                          "cannot be kept; write a manifest CSV with them")
    source = read_csv(path, text=wanted)
    meta = parts.meta.copy()
    for column in (c for c in wanted if c in source):
        meta[column] = source[column].astype("string").str.strip().loc[meta.index]
    return parts._replace(meta=meta, values=parts.values.drop(columns=wanted, errors="ignore"),
                          default=tuple(d for d in parts.default if d not in wanted))


def detect_format(path: Path) -> str:
    """Guess the format from the file name (``.npz``) or the CSV header."""
    if path.name.lower().endswith(".npz"):
        return "chestmnist"
    cols = set(header(path))
    lower = {c.lower() for c in cols}
    if {"Image Index", "Finding Labels"} <= cols:
        return "nih"
    if set(_MIMIC_IDS) <= cols and not {"image", "path"} & lower:
        return "mimic"
    if "Path" in cols and cols & set(CHEXPERT14):
        return "chexpert"
    if {"image", "path"} & lower:
        return "manifest"
    expected = "\n".join(f"  {fmt}: {desc}" for fmt, desc in _EXPECTED.items())
    raise RetuneError(f"cannot tell the format of {path} from its columns {sorted(cols)}; expected one of\n"
                      f"{expected}\nor pass --format")


def apply_uncertain(raw: pd.DataFrame, policy: Uncertain) -> pd.DataFrame:
    """Map raw 1/0/-1/NaN labels to 1/0/NaN by the uncertain policy (see the module docstring)."""
    if policy == "ignore":
        return raw.where(raw != -1)
    return raw.replace(-1.0, 1.0 if policy == "ones" else 0.0).fillna(0.0)


def patient_split(key: str, val_from: float = 0.8, test_from: float = 0.9) -> str:
    """Deterministic split of a patient (or image) id: 80/10/10 train/val/test by SHA-1."""
    f = _fraction(key)
    return "train" if f < val_from else "val" if f < test_from else "test"


def _fraction(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2**32


def _hash_splits(keys: pd.Series) -> pd.Series:
    return pd.Series([patient_split(str(k)) for k in keys], index=keys.index, dtype=object)


# ---- shared CSV helpers -------------------------------------------------------------------------------------

def _require(df: pd.DataFrame, path: Path, columns: Sequence[str], fmt: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise RetuneError(f"{path} lacks column(s) {missing} needed for the {fmt} format; expected columns: "
                          f"{_EXPECTED[fmt]}; found {list(df.columns)}")


def _select(names: tuple[str, ...], available: tuple[str, ...], path: Path
            ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(names as asked, file columns): matching ignores case and ``_``/space; Effusion = Pleural Effusion."""
    if not names:
        raise RetuneError(f"{path} has no disease columns; pass --diseases to name them")
    by_key = {disease_key(c): c for c in available}
    columns = []
    for name in names:
        column = by_key.get(disease_key(name)) or by_key.get(ALIASES.get(disease_key(name), ""))
        if column is None:
            raise RetuneError(f"{path} has no label column for {name!r}{did_you_mean(name, available)}; "
                              f"available: {', '.join(available)}")
        columns.append(column)
    return tuple(names), tuple(columns)


def _parse_values(values: pd.DataFrame, names: Sequence[str], path: Path) -> pd.DataFrame:
    """Parse label columns to float 1/0/-1/NaN named ``names``; anything else is a RetuneError naming the
    column and row."""
    out = np.empty(values.shape, dtype=np.float64)
    for i, col in enumerate(values.columns):
        src = values.iloc[:, i]
        if pd.api.types.is_bool_dtype(src) or pd.api.types.is_numeric_dtype(src):
            num = src.astype(float)
            unparsable = pd.Series(False, index=src.index)
        else:
            text = src.astype("string").str.strip()
            num = pd.to_numeric(text.replace("", pd.NA), errors="coerce").astype(float)
            unparsable = (num.isna() & text.notna() & (text != "")).fillna(False).astype(bool)
        bad = unparsable | (num.notna() & ~num.isin([1.0, 0.0, -1.0]))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            value = src.iloc[row] if isinstance(src.iloc[row], str) else f"{float(src.iloc[row]):g}"  # as written
            raise RetuneError(f"{path}: column {col!r} has value {value!r} in data row {row + 1}; label "
                              "columns hold 1 (positive), 0 (negative), -1 (uncertain) or blank (an empty cell). "
                              "If this is not a disease column, pick the disease columns with --diseases")
        out[:, i] = num.to_numpy()
    return pd.DataFrame(out, index=values.index, columns=list(names))


def _join(root: Path, refs: pd.Series, strip_root_name: bool = False) -> pd.Series:
    """Absolute image references: relative paths (also the path of ``x.npz::key::i``) are joined to ``root``.
    With ``strip_root_name``, a leading folder named like ``root`` is dropped (CheXpert's ``Path`` starts with
    ``CheXpert-v1.0-small/`` and its CSV sits inside that folder)."""
    base, name = str(root), root.name

    def one(ref: str) -> str:
        path, sep, rest = ref.strip().partition("::")
        if not os.path.isabs(path):
            first, _, tail = path.partition("/")
            path = os.path.join(base, tail if strip_root_name and first == name and tail else path)
        return path + sep + rest

    return pd.Series([one(str(r)) for r in refs], index=refs.index, dtype=object)


def _beside(path: Path, name: str) -> Path | None:
    for candidate in (path.parent / name, path.parent / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


# ---- formats ------------------------------------------------------------------------------------------------

def _chexpert(path: Path, root: Path, metadata: Path | None) -> _Parts:
    df = read_csv(path, text=("Path",))
    _require(df, path, ["Path"], "chexpert")
    rel = df["Path"].astype(str).str.strip()
    patient = rel.str.extract(r"(patient\d+)", expand=False)
    split = pd.Series(np.select([rel.str.contains(f"(?:^|/){d}/", regex=True) for d in ("train", "valid", "test")],
                                SPLITS, default=""), index=df.index, dtype=object)
    unsplit = split == ""
    split[unsplit] = _hash_splits(patient.fillna(rel)[unsplit])
    meta = pd.DataFrame({"image": _join(root, rel, strip_root_name=True), "split": split, "patient": patient})
    return _Parts(meta, df.drop(columns=[c for c in _CHEXPERT_META if c in df.columns]), CHEXPERT5)


def _nih(path: Path, root: Path, metadata: Path | None) -> _Parts:
    df = read_csv(path, text=("Image Index", "Finding Labels", "Patient ID"))
    _require(df, path, ["Image Index", "Finding Labels"], "nih")
    names = df["Image Index"].astype(str).str.strip()
    findings = [None if pd.isna(f) else {t.strip() for t in str(f).split("|")} - {""} for f in df["Finding Labels"]]
    seen = set().union(*(f for f in findings if f))
    extra = sorted(seen - set(NIH14) - {"No Finding"})
    values = pd.DataFrame({d: [np.nan if f is None else float(d in f) for f in findings]
                           for d in (*NIH14, "No Finding", *extra)}, index=df.index)
    patient = df["Patient ID"].str.strip() if "Patient ID" in df.columns else None
    key = names if patient is None else patient.fillna(names)
    meta = pd.DataFrame({"image": _nih_images(root, names), "split": _nih_splits(path, names, key)})
    if patient is not None:
        meta["patient"] = patient
    refuse_misspelled_columns(extra, (), path, what="finding in Finding Labels")
    notes = (f"unknown findings in Finding Labels: {', '.join(extra)}",) if extra else ()
    return _Parts(meta, values, NIH14, notes)


def _nih_images(root: Path, names: pd.Series) -> pd.Series:
    """Find each image under root, root/images, root/images_*/images (as the NIH download unpacks)."""
    found: dict[str, str] = {}
    for folder in (root, root / "images", *sorted(root.glob("images_*/images")), *sorted(root.glob("images_*"))):
        if folder.is_dir():
            with os.scandir(folder) as entries:
                for entry in entries:
                    found.setdefault(entry.name, entry.path)
    default = root / "images" if (root / "images").is_dir() else root
    return pd.Series([found.get(n, str(default / n)) for n in names], index=names.index, dtype=object)


def _nih_splits(path: Path, names: pd.Series, key: pd.Series) -> pd.Series:
    """Official lists beside the CSV when present (train_val split 8:1 into train/val by patient), else hash."""
    lists = {s: _beside(path, f"{s}_list.txt") for s in ("train_val", "test")}
    split = _hash_splits(key)
    for which, list_path in lists.items():
        if list_path is None:
            continue
        listed = names.isin({line.strip() for line in list_path.read_text().splitlines() if line.strip()})
        split[listed] = "test" if which == "test" else [patient_split(str(k), 8 / 9, 1.0) for k in key[listed]]
    return split


def _mimic(path: Path, root: Path, metadata: Path | None) -> _Parts:
    df = read_csv(path, text=_MIMIC_IDS)
    _require(df, path, list(_MIMIC_IDS), "mimic")
    df["subject_id"], df["study_id"] = df["subject_id"].str.strip(), df["study_id"].str.strip()
    if metadata is not None and not metadata.is_file():
        raise RetuneError(f"MIMIC metadata file {metadata} not found: pass mimic-cxr-2.0.0-metadata.csv(.gz)")
    metadata = metadata or _beside(path, "mimic-cxr-2.0.0-metadata.csv")
    notes: list[str] = []
    if metadata is None:
        notes.append("no mimic-cxr-2.0.0-metadata.csv found beside the labels (or given): one row per study and "
                     "the image is the study folder; pass the metadata CSV to get one row per JPEG")
        join_on = "study_id"
    else:
        md = read_csv(metadata, text=("dicom_id", *_MIMIC_IDS))
        _require(md, metadata, ["dicom_id", *_MIMIC_IDS], "mimic")
        n_studies = len(df)
        df = df.merge(md[["dicom_id", *_MIMIC_IDS]].apply(lambda s: s.str.strip()), on=list(_MIMIC_IDS))
        if df["study_id"].nunique() < n_studies:
            notes.append(f"{n_studies - df['study_id'].nunique()} labelled studies have no image in "
                         f"{metadata.name} and were left out")
        join_on = "dicom_id"
    image = "files/p" + df["subject_id"].str[:2] + "/p" + df["subject_id"] + "/s" + df["study_id"]
    if metadata is not None:
        image = image + "/" + df["dicom_id"] + ".jpg"
    split = _hash_splits(df["subject_id"])
    split_path = _beside(path, "mimic-cxr-2.0.0-split.csv")
    if split_path is not None:
        official = read_csv(split_path, text=(join_on,))
        _require(official, split_path, [join_on, "split"], "mimic")
        by_id = official.drop_duplicates(join_on).set_index(join_on)["split"].str.strip().str.lower()
        mapped = df[join_on].map(by_id).map(_SPLIT_NAMES)
        split = mapped.where(mapped.notna(), split).astype(object)
    meta = pd.DataFrame({"image": _join(root, image), "split": split, "patient": df["subject_id"]})
    values = df.drop(columns=["dicom_id", *_MIMIC_IDS], errors="ignore")
    return _Parts(meta, values, CHEXPERT5, tuple(notes))


def _chestmnist(path: Path, root: Path, metadata: Path | None) -> _Parts:
    try:
        with np.load(path) as npz:
            labels = {s: npz[f"{s}_labels"] for s in SPLITS if f"{s}_labels" in npz.files}
    except (OSError, ValueError, EOFError) as e:
        raise RetuneError(f"cannot read {path} as a MedMNIST npz archive ({e})") from e
    bad = [s for s, arr in labels.items() if arr.ndim != 2 or arr.shape[1] != len(NIH14)]
    if not labels or bad:
        raise RetuneError(f"{path} is not a ChestMNIST archive: expected {_EXPECTED['chestmnist']}")
    absolute = str(path.resolve())
    refs = [f"{absolute}::{s}_images::{i}" for s, arr in labels.items() for i in range(len(arr))]
    splits = [s for s, arr in labels.items() for _ in range(len(arr))]
    values = pd.DataFrame(np.concatenate(list(labels.values())).astype(float), columns=list(NIH14))
    return _Parts(pd.DataFrame({"image": refs, "split": splits}), values, NIH14)


def _manifest(path: Path, root: Path, metadata: Path | None) -> _Parts:
    columns = header(path)
    by_lower = {c.lower(): c for c in columns}
    image_col = by_lower.get("image") or by_lower.get("path")
    if image_col is None:
        raise RetuneError(f"{path} lacks an image column; expected columns: {_EXPECTED['manifest']}")
    optional = {k: by_lower[k] for k in ("split", "patient", "hospital") if k in by_lower}
    df = read_csv(path, text=(image_col, *optional.values()))
    rel = df[image_col].astype(str).str.strip()
    meta = pd.DataFrame({"image": _join(root, rel)})
    patient = df[optional["patient"]].str.strip() if "patient" in optional else None
    split = _hash_splits(rel if patient is None else patient.fillna(rel))
    if "split" in optional:
        given = df[optional["split"]].astype("string").str.strip().str.lower()
        mapped = given.map(_SPLIT_NAMES)
        unknown = sorted(set(given[given.notna() & (given != "") & mapped.isna()]))
        if unknown:
            raise RetuneError(f"{path}: unknown split value(s) {unknown}; use train, val or test (blank = by patient)")
        split = mapped.where(mapped.notna(), split).astype(object)
    meta["split"] = split
    if patient is not None:
        meta["patient"] = patient
    if "hospital" in optional:
        meta["hospital"] = df[optional["hospital"]].str.strip()
    values = df[[c for c in columns if c.lower() not in _MANIFEST_META]]
    return _Parts(meta, values, tuple(values.columns))


_READERS: dict[str, Callable[[Path, Path, Path | None], _Parts]] = {
    "chexpert": _chexpert, "nih": _nih, "mimic": _mimic, "chestmnist": _chestmnist, "manifest": _manifest,
}
