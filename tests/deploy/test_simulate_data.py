"""`retune simulate --data`: a federation on a researcher's own label file, split into hospitals patient by patient
with Flower Datasets' partitioners (natural, iid, Dirichlet, pathological), with partial labels per hospital."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from deploy.partition import PartitionSpec, partition_table, patient_keys
from deploy.sim_data import PARTITION_FILE, phantom_labels, prepare_data
from deploy.simulate import HOSPITALS_DIR, run_simulation, simulation_config
from research.phantom import write_phantom
from shared.config import SimulationData, SimulationPlan
from shared.data.readers import read_labels
from shared.errors import RetuneError
from shared.labels import CHEXPERT5

HOSPITALS, IMAGES, SIZE = 3, 160, 64
SETTINGS = {"stages": 2, "rounds_per_stage": 2, "local_epochs": 2}
CLI_SETTINGS = ["--stages", "2", "--rounds-per-stage", "2", "--local-epochs", "2"]
#: The names a consortium's pooled file gives the phantom hospitals 0, 1 and 2 (the third needs slugging).
NAMES = ("general", "north", "St Mary's")
QUIET = Console(quiet=True)


def retune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run([sys.executable, "-c", "from deploy.cli import main; main()", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """Phantom hospitals 0..2 as three sites' exports, merged into one manifest with a ``hospital`` column of names."""
    root = tmp_path_factory.mktemp("pool")
    frames = []
    for k, name in enumerate(NAMES):
        write_phantom(root / f"h{k}", IMAGES, hospital=k, seed=0, size=SIZE)
        frame = pd.read_csv(root / f"h{k}" / "manifest.csv", dtype={"patient": str})
        frames.append(frame.assign(image=f"h{k}/" + frame["image"], hospital=name))
    pd.concat(frames).to_csv(root / "pooled.csv", index=False)
    return root / "pooled.csv"


@pytest.fixture(scope="module")
def chexpert(pool: Path) -> Path:
    """The pooled images as a CheXpert download: CheXpert-v1.0-small/train.csv, three studies per patient,
    uncertain (-1) and blank cells, every path under train/."""
    pooled = pd.read_csv(pool, dtype={"patient": str})
    root = pool.parent / "CheXpert-v1.0-small"
    rows = []
    for i, row in pooled.iterrows():
        rel = f"train/patient{i // 3:05d}/study{i % 3 + 1}/view1_frontal.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(pool.parent / row["image"], root / rel)
        labels = {d: row[d] for d in CHEXPERT5}
        if i % 7 == 0:
            labels["Edema"] = -1
        if i % 11 == 0:
            labels["Cardiomegaly"] = None
        rows.append({"Path": f"CheXpert-v1.0-small/{rel}", "Sex": "Female", "Age": 60, "Frontal/Lateral": "Frontal",
                     "AP/PA": "PA", **labels})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root / "train.csv"


def _prevalence_spread(table, partition) -> float:
    """The largest difference, over diseases, between two hospitals' shares of positive images."""
    labels = table.labels()
    shares = np.array([np.nanmean(labels[rows] == 1, axis=0) for rows in partition.rows])
    return float(np.ptp(shares, axis=0).max())


def _prepare(tmp_path: Path, data: SimulationData, hospitals: int = 2):
    plan = SimulationPlan(hospitals=hospitals, data=data)
    return prepare_data(tmp_path / HOSPITALS_DIR, plan, 0, QUIET)


# ---- the partition itself --------------------------------------------------------------------------------------

def test_dirichlet_on_chexpert_is_patient_disjoint_deterministic_and_skewed(chexpert):
    table = read_labels(chexpert, "chexpert")
    keys = table.frame["patient"].to_numpy()  # CheXpert's patientNNNNN, read from each path
    spec = PartitionSpec.parse("dirichlet:0.3", 4, seed=0)
    first, again = partition_table(table, spec), partition_table(table, spec)
    assert [r.tolist() for r in first.rows] == [r.tolist() for r in again.rows]  # same seed, same hospitals
    other = partition_table(table, PartitionSpec.parse("dirichlet:0.3", 4, seed=1))
    assert [r.tolist() for r in first.rows] != [r.tolist() for r in other.rows]
    owners = [set(keys[rows]) for rows in first.rows]
    assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1:])  # no patient in two hospitals
    assert sorted(np.concatenate(first.rows).tolist()) == list(range(len(table)))  # every image somewhere
    iid = partition_table(table, PartitionSpec.parse("iid", 4, seed=0))
    assert _prevalence_spread(table, first) > max(0.2, 2 * _prevalence_spread(table, iid))  # label skew
    assert [len(r) for r in iid.rows] == [120, 120, 120, 120]  # 40 patients each, three images apiece


def test_skew_over_one_disease_and_pathological_classes(chexpert):
    table = read_labels(chexpert, "chexpert")
    edema = table.labels()[:, table.diseases.index("Edema")]
    by_edema = partition_table(table, PartitionSpec.parse("dirichlet:0.1:Edema", 3, seed=0))
    shares = [np.nanmean(edema[rows] == 1) for rows in by_edema.rows]
    assert max(shares) - min(shares) > 0.2
    two = partition_table(table, PartitionSpec.parse("pathological:2", 3, seed=0))
    positive = pd.DataFrame(table.labels() == 1, columns=list(table.diseases))
    patient = table.frame["patient"].to_numpy()
    for rows in two.rows:  # a patient's class: the diseases any of their images is positive for; 2 per hospital
        classes = positive.iloc[rows].groupby(patient[rows]).any().apply(tuple, axis=1)
        assert classes.nunique() == 2
    one = partition_table(table, PartitionSpec.parse("pathological:1:Edema", 2, seed=0))
    assert one.dropped_rows == 0  # hospital k's first class is class k: both Edema classes are kept
    assert sorted({bool(np.any(edema[rows] == 1)) for rows in one.rows}) == [False, True]
    with pytest.raises(RetuneError, match="not one of the run's diseases"):
        partition_table(table, PartitionSpec.parse("dirichlet:0.3:Edemaa", 3, seed=0))


@pytest.mark.parametrize("text, hospitals, message", [
    ("natural", 3, "does not go with --partition natural"),
    ("dirichlet:0.3", None, "needs --hospitals"),
    ("dirichlet:-1", 4, "positive number"),
    ("dirichlet:nan", 4, "positive number"),
    ("dirichlet:inf", 4, "positive number"),
    ("pathological:x", 4, "whole number"),
    ("iid:3", 4, "takes no parameter"),
    ("kmeans", 4, "use natural"),
])
def test_partition_text_is_checked(text, hospitals, message):
    with pytest.raises(RetuneError, match=message):
        PartitionSpec.parse(text, hospitals, seed=0)


# ---- clear errors ------------------------------------------------------------------------------------------------

def test_clear_errors_before_any_training(pool, chexpert, tmp_path):
    with pytest.raises(RetuneError, match="no 'site' column .*hospital"):
        _prepare(tmp_path / "a", SimulationData(str(pool), partition="natural:site"))
    with pytest.raises(RetuneError, match=r"160 patient\(s\), fewer than the 500 hospitals"):
        _prepare(tmp_path / "b", SimulationData(str(chexpert), partition="iid", splits="hash"), hospitals=500)
    with pytest.raises(RetuneError, match=r"general \(\d+ training, \d+ test\)"):
        _prepare(tmp_path / "c", SimulationData(str(pool), min_train_images=200))
    with pytest.raises(RetuneError, match="'south'.*not a hospital of this partition: general, north, St-Mary-s"):
        _prepare(tmp_path / "d", SimulationData(str(pool), hospital_labels="south=all"))
    with pytest.raises(RetuneError, match="labels 'Edemma' \\(did you mean 'Edema'\\?\\)"):
        _prepare(tmp_path / "e", SimulationData(str(pool), hospital_labels="north=Edemma"))
    with pytest.raises(RetuneError, match="train.csv has no test images under its official split.*--splits hash"):  # CheXpert's train.csv is all train
        _prepare(tmp_path / "f", SimulationData(str(chexpert), partition="iid"), hospitals=2)


def test_a_disease_nobody_can_learn_and_a_patient_in_two_hospitals_are_refused(pool, tmp_path):
    frame = pd.read_csv(pool, dtype={"patient": str})
    absent = frame.assign(Edema=0)
    absent.to_csv(pool.parent / "no-edema.csv", index=False)
    with pytest.raises(RetuneError, match="no hospital has a positive training image it labels of 'Edema':"):
        _prepare(tmp_path / "a", SimulationData(str(pool.parent / "no-edema.csv")))
    labelled_away = "general=Atelectasis;north=Atelectasis,Cardiomegaly;St-Mary-s=Atelectasis"
    with pytest.raises(RetuneError, match="labels of 'Consolidation', 'Edema', 'Pleural Effusion':"):
        _prepare(tmp_path / "b", SimulationData(str(pool), hospital_labels=labelled_away))
    shared = frame.copy()
    shared.loc[shared.index[-1], "patient"] = shared["patient"].iloc[0]  # the first patient seen at another site
    shared.to_csv(pool.parent / "shared.csv", index=False)
    with pytest.raises(RetuneError, match="has images under hospital general, St Mary's"):
        _prepare(tmp_path / "c", SimulationData(str(pool.parent / "shared.csv")))


def test_a_run_folder_keeps_its_partition(chexpert, tmp_path):
    data = SimulationData(str(chexpert), partition="dirichlet:0.3", splits="hash", min_train_images=10)
    made = _prepare(tmp_path, data, hospitals=4)
    assert json.loads((tmp_path / HOSPITALS_DIR / PARTITION_FILE).read_text()) == made.partition
    assert _prepare(tmp_path, data, hospitals=4).partition == made.partition  # the same command resumes
    with pytest.raises(RetuneError, match="hospitals were made otherwise .*alpha"):
        _prepare(tmp_path, SimulationData(**{**data.__dict__, "partition": "dirichlet:1.0"}), hospitals=4)
    with pytest.raises(RetuneError, match="hospitals were made otherwise .*seed"):
        prepare_data(tmp_path / HOSPITALS_DIR, SimulationPlan(hospitals=4, data=data), 1, QUIET)
    with pytest.raises(RetuneError, match="hospitals were made otherwise .*settings"):  # other labels, same split
        _prepare(tmp_path, SimulationData(**{**data.__dict__, "uncertain": "ones"}), hospitals=4)


def test_a_file_sorted_by_split_gives_every_hospital_every_split(pool, tmp_path):
    """Rows in file order train, then val, then test (as ChestMNIST stores them): the patients are shuffled by the
    seed before Flower Datasets deals them out, so no hospital gets only one split."""
    frame = pd.read_csv(pool, dtype={"patient": str})
    frame.sort_values("split", key=lambda s: s.map({"train": 0, "val": 1, "test": 2}), kind="stable").to_csv(
        pool.parent / "sorted.csv", index=False)
    for partition in ("dirichlet:0.5", "pathological:1:Edema", "iid"):
        made = _prepare(tmp_path / partition.replace(":", "-"),
                        SimulationData(str(pool.parent / "sorted.csv"), partition=partition), hospitals=3)
        assert all(h.train_images >= 20 and h.test_images > 0 for h in made.hospitals), partition


def test_chestmnist_through_prepare_data(tmp_path):
    """The README's ChestMNIST command: images inside the .npz, one patient per image, official splits stored in
    order; every hospital gets train and test images, and the '::' references reach its manifest."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 300), ("val", 40), ("test", 90)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((n, 14)) < 0.25).astype(np.uint8)
    np.savez(tmp_path / "chestmnist.npz", **arrays)
    made = _prepare(tmp_path / "run", SimulationData(str(tmp_path / "chestmnist.npz"),
                                                     partition="dirichlet:0.5:Effusion"), hospitals=4)
    assert all(h.test_images > 0 for h in made.hospitals)
    manifest = pd.read_csv(made.hospitals[0].manifest)
    assert manifest["image"].str.contains(r"chestmnist\.npz::(?:train|val|test)_images::\d+$").all()
    assert read_labels(made.hospitals[0].manifest, allow_outside_paths=True).diseases == made.diseases


def test_natural_partition_by_another_column(pool, tmp_path):
    """A manifest's own 'site' column (text, not a disease) and CheXpert's 'AP/PA' each make a natural partition."""
    frame = pd.read_csv(pool, dtype={"patient": str})
    frame.rename(columns={"hospital": "site"}).to_csv(pool.parent / "by-site.csv", index=False)
    made = _prepare(tmp_path / "site", SimulationData(str(pool.parent / "by-site.csv"), partition="natural:site"))
    assert [h.name for h in made.hospitals] == ["general", "north", "St-Mary-s"] and made.diseases == CHEXPERT5
    chexpert = pd.read_csv(pool.parent / "CheXpert-v1.0-small" / "train.csv")
    chexpert["AP/PA"] = np.where(np.arange(len(chexpert)) // 3 % 2 == 0, "AP", "PA")  # per patient
    chexpert.to_csv(pool.parent / "CheXpert-v1.0-small" / "views.csv", index=False)
    views = _prepare(tmp_path / "view", SimulationData(str(pool.parent / "CheXpert-v1.0-small" / "views.csv"),
                                                       partition="natural:AP/PA", splits="hash"))
    assert [h.name for h in views.hospitals] == ["AP", "PA"] and [h.patients for h in views.hospitals] == [80, 80]
    with pytest.raises(RetuneError, match="every image has the same 'hospital' \\(general\\).*at least 2"):
        frame.assign(hospital="general").to_csv(pool.parent / "one-site.csv", index=False)
        _prepare(tmp_path / "one", SimulationData(str(pool.parent / "one-site.csv")))


def test_phantoms_cannot_be_repartitioned_in_place(tmp_path):
    with pytest.raises(RetuneError, match="split a label file given with --data"):
        _prepare(tmp_path, SimulationData(partition="iid"))


def test_hospital_labels_from_a_toml_file(pool, tmp_path):
    toml = tmp_path / "labels.toml"
    toml.write_text('general = ["Edema", "Atelectasis"]\n"St-Mary-s" = "all"\n')
    made = _prepare(tmp_path, SimulationData(str(pool), hospital_labels=str(toml)))
    labelled = {h.name: h.labelled for h in made.hospitals}
    assert labelled == {"general": ("Edema", "Atelectasis"), "north": CHEXPERT5, "St-Mary-s": CHEXPERT5}
    general = pd.read_csv(made.hospitals[0].manifest)
    assert general["Cardiomegaly"].isna().all() and general["Edema"].notna().all()
    assert made.hospitals[0].positives["Cardiomegaly"] is None


# ---- whole federations -------------------------------------------------------------------------------------------

def test_a_merged_phantom_manifest_federates_like_the_phantom_simulation(pool, tmp_path):
    """Natural partition by name; the same labels per hospital as the phantom hospitals → within 0.01."""
    phantom = run_simulation(simulation_config(tmp_path / "phantom", HOSPITALS, **SETTINGS),
                             SimulationPlan(hospitals=HOSPITALS, images_per_hospital=IMAGES, image_size=SIZE),
                             Console(quiet=True))
    partial = "St-Mary-s=" + ",".join(phantom_labels(2))  # hospital 2 leaves Consolidation unlabelled
    out = tmp_path / "pooled"
    done = retune("simulate", "--data", str(pool), "--hospital-labels", partial, "--out", str(out), *CLI_SETTINGS,
                  cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [h["name"] for h in report["hospitals"]] == ["general", "north", "St-Mary-s"]
    assert report["partition"]["kind"] == "natural" and report["partition"]["images"] == [IMAGES] * 3
    assert report["partition"]["per_hospital"][2]["positives"]["Consolidation"] is None
    assert report["hospitals"][2]["labelled"] == list(phantom_labels(2))
    assert abs(report["final"]["exact_macro_auroc"] - phantom["final"]["exact_macro_auroc"]) <= 0.01
    assert abs(report["baselines"]["centralized"]["macro_auroc"]
               - phantom["baselines"]["centralized"]["macro_auroc"]) <= 0.01
    assert phantom["partition"]["source"] == "phantoms" and phantom["partition"]["hospitals"] == [
        "hospital-0", "hospital-1", "hospital-2"]
    page = (out / "report.html").read_text()
    assert "<h2>Partition</h2>" in page and 'alt="positives per disease per hospital"' in page


def test_chexpert_with_dirichlet_over_four_hospitals(chexpert, tmp_path):
    out = tmp_path / "run"
    args = ["simulate", "--data", str(chexpert), "--partition", "dirichlet:0.3", "--hospitals", "4", "--splits",
            "hash", "--min-train-images", "10", "--stages", "1", "--rounds-per-stage", "2", "--local-epochs", "1",
            "--out", str(out)]
    done = retune(*args, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()  # a pipe, not a terminal: the last lines are whole, one figure each
    assert any(line.startswith("trained retune: ") for line in lines), done.stderr[-2000:]
    assert any(line.startswith("final macro AUROC ") and line.endswith(" s/round") for line in lines)
    report = json.loads((out / "report.json").read_text())
    assert report["partition"]["kind"] == "dirichlet" and report["partition"]["alpha"] == 0.3
    assert report["final"]["macro_auroc"] is not None and len(report["hospitals"]) == 4
    patients = [set(pd.read_csv(out / HOSPITALS_DIR / f"hospital-{k}" / "manifest.csv", dtype=str)["image"]
                    .str.extract(r"/(patient\d+)/", expand=False)) for k in range(4)]
    assert sum(map(len, patients)) == len(set().union(*patients)) == 160
    expected = partition_table(read_labels(chexpert, "chexpert"), PartitionSpec.parse("dirichlet:0.3", 4, seed=0),
                               10)
    assert report["partition"]["images"] == [len(r) for r in expected.rows]
    prevalence = [[h["positives"][d] / images for d in CHEXPERT5]
                  for h, images in zip(report["partition"]["per_hospital"], report["partition"]["images"])]
    assert np.ptp(np.array(prevalence), axis=0).max() > 0.15  # label distributions differ between hospitals
    missing = retune("simulate", "--data", str(chexpert), "--partition", "natural:site", "--splits", "hash",
                     "--out", str(tmp_path / "x"),
                     cwd=Path(__file__).resolve().parents[2])
    assert missing.returncode == 2 and "no 'site' column" in missing.stderr


# ---- real label files, and the README's commands ------------------------------------------------------------------

@pytest.mark.parametrize("name, fmt, partition", [("Data_Entry_2017_v2020.csv.gz", "nih", "dirichlet:0.3"),
                                                  ("chexpert_train.csv.gz", "chexpert", "iid")])
def test_real_label_files_split_patient_by_patient_in_seconds(name, fmt, partition):
    """NIH ChestX-ray14's 112,120 rows and CheXpert's 223,414 (the label CSVs torchxrayvision ships; no images)."""
    from tests.shared.data.test_check import real_csv

    table = read_labels(real_csv(name), fmt, allow_outside_paths=True)
    made = partition_table(table, PartitionSpec.parse(partition, 5, seed=0), 20)
    keys = patient_keys(table).to_numpy()
    owners = [set(keys[rows]) for rows in made.rows]
    assert sum(map(len, owners)) == len(set().union(*owners)) == len(set(keys))
    assert sum(map(len, made.rows)) == len(table) and min(map(len, made.rows)) >= 20


def test_the_readmes_simulate_commands_are_valid():
    """Every `retune simulate --data` line of the README parses: its options exist and its partition is valid."""
    import shlex

    import typer

    from deploy.cli import app

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.startswith("retune simulate --data")]
    formats = {"chexpert": "CheXpert", "nih": "Data_Entry", "mimic": "mimic-cxr", "chestmnist": ".npz",
               "manifest": "pilot.csv"}
    assert all(any(marker in line for line in lines) for marker in formats.values())  # one per supported format
    simulate = typer.main.get_command(app).commands["simulate"]
    for line in lines:
        context = simulate.make_context("simulate", shlex.split(line)[2:])
        PartitionSpec.parse(context.params["partition"], context.params["hospitals"], seed=0)
