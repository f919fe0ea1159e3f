"""Split a label table into simulated hospitals, patient by patient, with Flower Datasets' partitioners.

``--partition`` takes:

- ``natural`` / ``natural:COLUMN``: one hospital per value of a column (``hospital`` by default), named by the value
  (:class:`~flwr_datasets.partitioner.NaturalIdPartitioner`);
- ``iid``: patients shuffled by the seed and dealt into ``--hospitals`` equal parts
  (:class:`~flwr_datasets.partitioner.IidPartitioner`);
- ``dirichlet:ALPHA[:BY]``: label skew, each hospital's share of every class drawn from Dirichlet(ALPHA); small ALPHA
  is strongly non-IID (:class:`~flwr_datasets.partitioner.DirichletPartitioner`);
- ``pathological:K[:BY]``: each hospital holds exactly K classes
  (:class:`~flwr_datasets.partitioner.PathologicalPartitioner`).

BY is a disease (a patient's class: whether any of their images is positive for it) or ``combination`` (default:
the set of diseases a patient has any positive image for, e.g. ``Edema+Pleural Effusion``, ``none``). The
partitioners see one row per patient, so a patient's images always stay in one hospital; a hospital keeps the rows
in file order, with the split the label file gave them. The same table, partition and seed give the same
hospitals.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from dataclasses import asdict, dataclass

import datasets  # Flower Datasets' partitioners work on a Hugging Face Dataset
import numpy as np
import pandas as pd
from flwr_datasets.partitioner import (DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, Partitioner,
                                       PathologicalPartitioner)

from shared.data.readers import LabelTable
from shared.errors import RetuneError
from shared.wire import SITE_NAME

PARTITIONS = ("natural", "iid", "dirichlet", "pathological")
COMBINATION = "combination"
#: The column a natural partition reads when none is named.
HOSPITAL_COLUMN = "hospital"


@dataclass(frozen=True)
class PartitionSpec:
    """How a label table becomes hospitals (see the module docstring for the text form)."""

    kind: str = "natural"
    column: str = HOSPITAL_COLUMN
    alpha: float = 0.0
    classes: int = 0
    by: str = COMBINATION
    hospitals: int | None = None
    seed: int = 0

    @classmethod
    def parse(cls, text: str, hospitals: int | None, seed: int) -> PartitionSpec:
        """``natural[:COLUMN]``, ``iid``, ``dirichlet:ALPHA[:BY]`` or ``pathological:K[:BY]``; ``hospitals`` is
        ``--hospitals`` (needed by every kind but ``natural``, which takes the count from the data)."""
        kind, _, rest = text.strip().partition(":")
        if kind not in PARTITIONS:
            raise RetuneError(f"--partition {text!r}: use natural[:COLUMN], iid, dirichlet:ALPHA[:DISEASE] or "
                              "pathological:K[:DISEASE]")
        if kind == "natural":
            if hospitals is not None:
                raise RetuneError("--hospitals does not go with --partition natural: the hospitals are the values "
                                  f"of the {rest or HOSPITAL_COLUMN!r} column")
            return cls("natural", column=rest or HOSPITAL_COLUMN, seed=seed)
        if hospitals is None or hospitals < 2:
            raise RetuneError(f"--partition {kind} needs --hospitals N (at least 2)")
        if kind == "iid":
            if rest:
                raise RetuneError(f"--partition {text!r}: iid takes no parameter")
            return cls("iid", hospitals=hospitals, seed=seed)
        number, _, by = rest.partition(":")
        try:
            value = float(number) if kind == "dirichlet" else int(number)
        except ValueError:
            value = 0
        if not (math.isfinite(value) and value > 0):
            what = "ALPHA, a positive number" if kind == "dirichlet" else "K, a positive whole number of classes"
            raise RetuneError(f"--partition {text!r}: {kind} needs {what} (e.g. {kind}:"
                              f"{'0.3' if kind == 'dirichlet' else '2'})")
        settings = {"alpha": value} if kind == "dirichlet" else {"classes": value}
        return cls(kind, by=by.strip() or COMBINATION, hospitals=hospitals, seed=seed, **settings)

    def describe(self) -> str:
        """One line for people, e.g. ``dirichlet α=0.3 over the label combination, 4 hospitals, seed 0``."""
        over = "the label combination" if self.by == COMBINATION else self.by
        return {"natural": f"natural: one hospital per value of the {self.column!r} column",
                "iid": f"iid: patients shuffled into {self.hospitals} equal hospitals, seed {self.seed}",
                "dirichlet": f"dirichlet α={self.alpha:g} over {over}, {self.hospitals} hospitals, seed {self.seed}",
                "pathological": f"pathological: {self.classes} classes of {over} per hospital, {self.hospitals} "
                                f"hospitals, seed {self.seed}"}[self.kind]


@dataclass(frozen=True)
class Partition:
    """Hospitals made from a table: ``names[k]`` holds the table rows ``rows[k]`` (file order)."""

    spec: PartitionSpec
    names: tuple[str, ...]
    rows: tuple[np.ndarray, ...]
    patients: tuple[int, ...]
    dropped_rows: int

    def record(self) -> dict:
        """What report.json and the run folder keep of it."""
        return {**asdict(self.spec), "description": self.spec.describe(), "hospitals": list(self.names),
                "patients": list(self.patients), "images": [len(r) for r in self.rows],
                "dropped_images": self.dropped_rows}


def patient_keys(table: LabelTable) -> pd.Series:
    """Each row's patient: the ``patient`` column where the file has one, else the image itself."""
    image = table.frame["image"].astype(str)
    if "patient" not in table.frame:
        return image
    return table.frame["patient"].astype("string").str.strip().replace("", pd.NA).fillna(image).astype(str)


def patient_classes(table: LabelTable, keys: pd.Series, by: str) -> pd.Series:
    """Each patient's class (index: patient, in order of first appearance) for a label-skew partition."""
    positive = pd.DataFrame(table.labels() == 1, columns=list(table.diseases), index=keys.index)
    any_positive = positive.groupby(keys.to_numpy(), sort=False).any()
    if by == COMBINATION:
        return any_positive.apply(lambda row: "+".join(d for d in table.diseases if row[d]) or "none", axis=1)
    if by not in table.diseases:
        raise RetuneError(f"--partition skews by {by!r}, which is not one of the run's diseases "
                          f"({', '.join(table.diseases)}) nor {COMBINATION!r}")
    return any_positive[by].map({True: f"{by} positive", False: f"no {by}"})


def partition_table(table: LabelTable, spec: PartitionSpec, min_patients: int = 1) -> Partition:
    """Split ``table`` into hospitals by ``spec`` with Flower Datasets (one row per patient). A Dirichlet draw that
    leaves a hospital fewer than ``min_patients`` patients (at most an even share) is drawn again, up to 10 times."""
    keys = patient_keys(table)
    order = pd.unique(keys)
    if spec.kind != "natural" and spec.hospitals > len(order):
        raise RetuneError(f"{table.source} has {len(order)} patient(s), fewer than the {spec.hospitals} hospitals "
                          "asked for: a patient's images stay in one hospital, so some hospital would be empty")
    patients = pd.DataFrame({"patient_index": np.arange(len(order))}, index=order)
    if spec.kind == "natural":
        patients["natural"] = _natural_values(table, keys, spec.column).loc[order].to_numpy()
        if patients["natural"].nunique() < 2:
            raise RetuneError(f"--partition natural:{spec.column}: every image has the same {spec.column!r} "
                              f"({patients['natural'].iloc[0]}), and a federation needs at least 2 hospitals; "
                              "split it with iid, dirichlet:ALPHA or pathological:K and --hospitals N")
    elif spec.kind != "iid":
        patients["class"] = patient_classes(table, keys, spec.by).loc[order].to_numpy()
    dataset = datasets.Dataset.from_pandas(patients, preserve_index=False)
    with contextlib.redirect_stderr(io.StringIO()):  # the partitioners' progress bars
        try:
            partitioner = _partitioner(spec, len(order), min_patients)
            # every kind but natural deals out patients in file order (Dirichlet and pathological a class's
            # patients in one run each): shuffled by the seed, a file sorted by split or by id skews nothing
            partitioner.dataset = dataset if spec.kind == "natural" else dataset.shuffle(seed=spec.seed)
            parts = [np.asarray(partitioner.load_partition(k)["patient_index"], dtype=np.int64)
                     for k in range(partitioner.num_partitions)]
        except ValueError as exc:  # e.g. Dirichlet could not give every hospital a patient in 10 draws
            raise RetuneError(f"--partition {spec.describe()}: Flower Datasets could not partition "
                              f"{len(order)} patients: {exc}") from None
    names = (_hospital_names([partitioner.partition_id_to_natural_id[k] for k in range(len(parts))])
             if spec.kind == "natural" else [f"hospital-{k}" for k in range(len(parts))])
    patient_of_row = pd.Series(patients["patient_index"]).loc[keys.to_numpy()].to_numpy()
    rows = [np.flatnonzero(np.isin(patient_of_row, part)) for part in parts]
    ranked = sorted(range(len(parts)), key=lambda k: _natural_key(names[k]))
    kept = sum(len(r) for r in rows)
    return Partition(spec, tuple(names[k] for k in ranked), tuple(rows[k] for k in ranked),
                     tuple(len(parts[k]) for k in ranked), len(table) - kept)


def _partitioner(spec: PartitionSpec, patients: int, min_patients: int) -> Partitioner:
    """The Flower Datasets partitioner of ``spec`` over a dataset of ``patients`` rows."""
    if spec.kind == "natural":
        return NaturalIdPartitioner(partition_by="natural")
    if spec.kind == "iid":
        return IidPartitioner(num_partitions=spec.hospitals)
    if spec.kind == "dirichlet":
        return DirichletPartitioner(num_partitions=spec.hospitals, partition_by="class", alpha=spec.alpha, seed=spec.seed,
                         min_partition_size=max(1, min(min_patients, patients // spec.hospitals)))
    # the first class of hospital k is class k: with at least as many hospitals as classes, every class is kept
    return PathologicalPartitioner(num_partitions=spec.hospitals, partition_by="class", num_classes_per_partition=spec.classes,
                        class_assignment_mode="first-deterministic", seed=spec.seed)


def _natural_values(table: LabelTable, keys: pd.Series, column: str) -> pd.Series:
    """The natural column's value of each patient (index: patient); a patient under two values is an error."""
    if column not in table.frame:
        present = [c for c in table.frame.columns if c not in table.diseases]
        raise RetuneError(f"--partition natural:{column}: {table.source} has no {column!r} column (its columns: "
                          f"{', '.join(present)}); name one with --partition natural:COLUMN, or choose iid, "
                          "dirichlet:ALPHA or pathological:K with --hospitals N")
    values = table.frame[column].astype("string").str.strip()
    blank = values.isna() | (values == "")
    if blank.any():
        row = int(np.flatnonzero(blank.to_numpy())[0])
        raise RetuneError(f"{table.source}: {column!r} is blank in data row {row + 1}: every image needs the "
                          f"hospital it belongs to under --partition natural:{column}")
    per_patient = values.groupby(keys.to_numpy(), sort=False).unique()
    split = per_patient[per_patient.map(len) > 1]
    if len(split):
        patient, where = split.index[0], ", ".join(map(str, split.iloc[0]))
        raise RetuneError(f"patient {patient!r} has images under {column} {where}: a patient's images stay in one "
                          f"hospital ({len(split)} patient(s) like this); if patient ids are only unique within a "
                          "site, make them unique across sites (e.g. prefix the site)")
    return per_patient.map(lambda v: str(v[0]))


def _hospital_names(values: list[str]) -> list[str]:
    """Hospital names from natural ids: characters a name cannot hold become '-' (two ids that would then share a
    name are an error)."""
    names = [re.sub(r"[^A-Za-z0-9._-]+", "-", v).strip("-")[:64] or "hospital" for v in values]
    for value, name in zip(values, names):
        if not SITE_NAME.fullmatch(name):
            raise RetuneError(f"hospital {value!r} cannot be named: use letters, digits, '.', '_' or '-'")
    if len(set(names)) < len(names):
        clash = next(n for n in names if names.count(n) > 1)
        raise RetuneError(f"two hospitals ({', '.join(v for v, n in zip(values, names) if n == clash)}) would both "
                          f"be named {clash!r}: make their values differ in letters or digits")
    return names


def _natural_key(name: str) -> list:
    """Sort key that puts hospital-2 before hospital-10, and ignores case."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]
