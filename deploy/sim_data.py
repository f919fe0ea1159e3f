"""The hospitals of a simulation, made from one label table: phantoms (the default) or a researcher's own file.

One path for both: the table is partitioned patient by patient (:mod:`deploy.partition`), each hospital keeps the
rows it got with the labels it labels (``--hospital-labels``), and gets its own folder under the run's
``hospitals/`` with a manifest of those rows (absolute image paths, labels after the uncertain policy) that its
simulated SuperNode reads like any hospital's label file. Phantom hospitals are written once under
``hospitals/phantoms/`` and merged into one manifest with a ``hospital`` column, partitioned by its natural value.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console

from deploy.partition import Partition, PartitionSpec, partition_table, patient_keys
from shared.artifact import sha256_file
from shared.config import SimulationPlan
from shared.data.names import did_you_mean
from shared.data.readers import LabelTable, patient_split, read_labels
from shared.errors import RetuneError
from shared.labels import CHEXPERT5

PHANTOMS_DIR = "phantoms"
#: What gives small hospitals more images, per partition kind.
_LARGER = {"iid": "fewer hospitals", "dirichlet": "fewer hospitals or a larger alpha",
           "pathological": "fewer hospitals or a larger K"}
PARTITION_FILE = "partition.json"
SITE_MANIFEST = "manifest.csv"


@dataclass(frozen=True)
class SimulatedHospital:
    """One hospital of a simulation: its name, the manifest of its rows and the diseases it labels."""

    name: str
    manifest: Path
    labelled: tuple[str, ...]
    patients: int
    train_images: int
    test_images: int
    positives: dict[str, int | None]  # None: a disease it does not label


@dataclass(frozen=True)
class SimulatedData:
    """Every hospital of a simulation, the federation's diseases and how the table was split."""

    hospitals: tuple[SimulatedHospital, ...]
    diseases: tuple[str, ...]
    partition: dict

    def record(self) -> dict:
        """The partition panel of report.json: settings, and images and positives per disease per hospital."""
        return {**self.partition, "diseases": list(self.diseases), "per_hospital": [
            {"name": h.name, "patients": h.patients, "train_images": h.train_images, "test_images": h.test_images,
             "labelled": list(h.labelled), "positives": h.positives} for h in self.hospitals]}


def phantom_labels(hospital: int, diseases: tuple[str, ...] = CHEXPERT5) -> tuple[str, ...]:
    """What phantom hospital k labels: 0 and 1 everything; k ≥ 2 all but disease k mod C (partial labels)."""
    return tuple(d for c, d in enumerate(diseases) if hospital < 2 or c != hospital % len(diseases))


def prepare_data(sim_dir: Path, plan: SimulationPlan, seed: int, console: Console) -> SimulatedData:
    """Read (or write, for phantoms) the label table, partition it and write each hospital's folder under
    ``sim_dir``; the same settings give the same hospitals, and a run folder partitioned otherwise is refused."""
    data = plan.data
    if data.path:
        spec = PartitionSpec.parse(data.partition, None if data.partition.startswith("natural") else plan.hospitals,
                                   seed)
        labelled = hospital_labels(data.hospital_labels)
        table = read_labels(data.path, data.format, data.diseases or None, data.uncertain, data.image_root or None,
                            data.metadata or None, data.allow_outside_paths,
                            keep=(spec.column,) if spec.kind == "natural" else ())
    else:
        if data.partition != "natural" or data.hospital_labels:
            raise RetuneError("--partition and --hospital-labels split a label file given with --data; without it "
                              "the hospitals are phantoms, one per scanner style (to re-split phantoms, write them "
                              "with `retune phantom` into one manifest and pass it with --data)")
        table = read_labels(write_phantoms(sim_dir / PHANTOMS_DIR, plan, seed, console), "manifest")
        spec = PartitionSpec("natural", seed=seed)
        labelled = {f"hospital-{k}": phantom_labels(k, table.diseases) for k in range(plan.hospitals)}
    if data.splits == "hash":
        table.frame["split"] = patient_keys(table).map(patient_split)
    elif data.splits != "official":
        raise RetuneError(f"--splits {data.splits!r}: use official or hash")
    missing = [name for name in ("train", "test") if not (table.frame["split"] == name).any()]
    if missing:
        raise RetuneError(f"{table.source} has no {' and no '.join(missing)} images under its official split (e.g. "
                          "CheXpert's train.csv is all train): pass --splits hash to split its patients 80/10/10")
    with console.status(f"partitioning {len(table):,} images: {spec.describe()}"):
        partition = partition_table(table, spec, data.min_train_images)
    if partition.dropped_rows:
        console.print(f"[yellow]{partition.dropped_rows:,} of {len(table):,} images are in no hospital[/]: "
                      f"{spec.describe()} leaves out the classes no hospital drew (with many label combinations, "
                      "skew by one disease: pathological:K:DISEASE)")
    unknown = sorted(set(labelled) - set(partition.names))
    if unknown:
        raise RetuneError(f"--hospital-labels names {unknown[0]!r}{did_you_mean(unknown[0], partition.names)}, "
                          f"which is not a hospital of this partition: {', '.join(partition.names)}")
    record = {**partition.record(), "source": str(Path(table.source).resolve()) if data.path else "phantoms",
              "format": table.format, "splits": data.splits, "sha256": sha256_file(Path(table.source)),
              "settings": asdict(data),
              "labelled": {name: list(labelled.get(name) or table.diseases) for name in partition.names}}
    _refuse_another_partition(sim_dir / PARTITION_FILE, record)
    simulated = _hospitals(table, partition, labelled, data.min_train_images, sim_dir)
    (sim_dir / PARTITION_FILE).write_text(json.dumps(record, indent=1))
    return SimulatedData(simulated, table.diseases, record)


def write_phantoms(folder: Path, plan: SimulationPlan, seed: int, console: Console) -> Path:
    """Phantom hospitals 0..N-1 (once each) and their merged manifest with a ``hospital`` column."""
    from research.phantom import write_phantom

    frames = []
    for k in range(plan.hospitals):
        name = f"hospital-{k}"
        if not (folder / name / SITE_MANIFEST).exists():
            with console.status(f"writing {plan.images_per_hospital} phantom images of {name}"):
                write_phantom(folder / name, n=plan.images_per_hospital, hospital=k, seed=seed, size=plan.image_size)
        frame = pd.read_csv(folder / name / SITE_MANIFEST, dtype={"patient": str})
        frames.append(frame.assign(image=name + "/" + frame["image"], hospital=name))
    merged = folder / SITE_MANIFEST
    pd.concat(frames).to_csv(merged, index=False)
    return merged


def hospital_labels(text: str) -> dict[str, tuple[str, ...] | None]:
    """``--hospital-labels``: ``'site-a=Edema,Atelectasis;site-b=all'`` or a TOML file of ``site = "..."`` or
    ``site = [...]`` lines; a hospital it does not name labels everything (``None``)."""
    if not text.strip():
        return {}
    path = Path(text).expanduser()
    if text.endswith(".toml") or path.is_file():
        try:
            entries = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise RetuneError(f"--hospital-labels {text}: cannot read it as TOML: {exc}") from None
    else:
        entries = {}
        for part in filter(str.strip, text.split(";")):
            name, sep, value = part.partition("=")
            if not sep or not name.strip():
                raise RetuneError(f"--hospital-labels {part.strip()!r}: write HOSPITAL=DISEASE,DISEASE or "
                                  "HOSPITAL=all, entries separated by ';'")
            entries[name.strip()] = value
    out: dict[str, tuple[str, ...] | None] = {}
    for name, value in entries.items():
        names = value if isinstance(value, list) else str(value).split(",")
        diseases = tuple(str(d).strip() for d in names if str(d).strip())
        if not diseases:
            raise RetuneError(f"--hospital-labels: {name} labels nothing; name its diseases or 'all'")
        out[name] = None if diseases == ("all",) else diseases
    return out


def _hospitals(table: LabelTable, partition: Partition, labelled: dict, min_train: int, sim_dir: Path
               ) -> tuple[SimulatedHospital, ...]:
    """Each hospital's rows with what it labels; hospitals too small to train and diseases nobody can learn are
    refused before any manifest is written."""
    labels, split = table.labels(), table.frame["split"].to_numpy()
    for name, chosen in labelled.items():
        for disease in chosen or ():
            if disease not in table.diseases:
                raise RetuneError(f"--hospital-labels: {name} labels {disease!r}{did_you_mean(disease, table.diseases)}, "
                                  f"which is not a disease of this run: {', '.join(table.diseases)}")
    # each hospital's labels, NaN where it does not label the disease
    masked = [np.where(np.isin(table.diseases, labelled.get(name) or table.diseases), labels[rows], np.nan)
              for name, rows in zip(partition.names, partition.rows)]
    counts = [(int(np.sum(split[rows] == "train")), int(np.sum(split[rows] == "test"))) for rows in partition.rows]
    small = [f"{name} ({train} training, {test} test)" for name, (train, test) in zip(partition.names, counts)
             if train < min_train or test == 0]
    if small:
        raise RetuneError(f"{len(small)} hospital(s) of {partition.spec.describe()} have fewer than "
                          f"{min_train} training images or no test image: {', '.join(small)}; use "
                          f"{_LARGER.get(partition.spec.kind, 'more data')}, or lower --min-train-images")
    learnt = np.logical_or.reduce([np.any(mine[split[rows] == "train"] == 1, axis=0)
                                   for mine, rows in zip(masked, partition.rows)])
    if not learnt.all():
        unlearnable = ", ".join(repr(d) for d, ok in zip(table.diseases, learnt) if not ok)
        raise RetuneError(f"no hospital has a positive training image it labels of {unlearnable}: such a disease "
                          "cannot be learnt; leave it out with --diseases, or label it somewhere (--hospital-labels)")
    keys = patient_keys(table).to_numpy()
    hospitals = []
    for k, (name, rows, mine, (train, test)) in enumerate(zip(partition.names, partition.rows, masked, counts)):
        folder = sim_dir / f"hospital-{k}"
        folder.mkdir(parents=True, exist_ok=True)
        site = pd.DataFrame({"image": table.frame["image"].to_numpy()[rows], "split": split[rows],
                             "patient": keys[rows], "hospital": name})
        pd.concat([site, pd.DataFrame(mine, columns=list(table.diseases)).astype("Int64")], axis=1).to_csv(
            folder / SITE_MANIFEST, index=False)
        chosen = labelled.get(name) or table.diseases
        positives = {d: int(np.sum(mine[:, c] == 1)) if d in chosen else None for c, d in enumerate(table.diseases)}
        hospitals.append(SimulatedHospital(name, folder / SITE_MANIFEST, tuple(chosen), partition.patients[k], train,
                                           test, positives))
    return tuple(hospitals)


def _refuse_another_partition(path: Path, record: dict) -> None:
    """A run folder whose hospitals were made otherwise is refused: resuming would mix two federations."""
    if path.exists():
        before = json.loads(path.read_text())
        changed = sorted(k for k in record.keys() | before.keys() if before.get(k) != record.get(k))
        if changed:
            raise RetuneError(f"this run folder's hospitals were made otherwise ({', '.join(changed)} differ): "
                              "choose another --out, or run with the settings it was started with")
