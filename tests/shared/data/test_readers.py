"""read_labels on tiny synthetic files with the real column names of each format."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.data.images import load_image
from shared.data.readers import apply_uncertain, detect_format, patient_split, read_labels
from shared.errors import RetuneError
from shared.labels import CHEXPERT5, CHEXPERT14, NIH14

CHEXPERT_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT14)


def chexpert_row(path: str, **labels: str) -> str:
    return f"{path},Female,68,Frontal,AP," + ",".join(labels.get(c.replace(" ", "_"), "") for c in CHEXPERT14)


def write_chexpert(folder, name="train.csv", extra_rows=()) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        chexpert_row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", No_Finding="1.0",
                     Pneumothorax="0.0", Support_Devices="1.0"),
        chexpert_row("CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg", Cardiomegaly="-1.0",
                     Edema="-1.0", Consolidation="-1.0", Atelectasis="-1.0", Pleural_Effusion="-1.0"),
        chexpert_row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", Cardiomegaly="1.0",
                     Atelectasis="0.0", Pleural_Effusion="0.0", Edema="1"),
        *extra_rows,
    ]
    path = folder / name
    path.write_text("\n".join([CHEXPERT_HEADER, *rows]) + "\n")
    return str(path)


def test_chexpert_uncertain_policies_and_raw(tmp_path):
    csv = write_chexpert(tmp_path / "CheXpert-v1.0-small")
    nan = np.nan
    #            Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion
    raw = np.array([[nan, nan, nan, nan, nan], [-1, -1, -1, -1, -1], [0, 1, nan, 1, 0]])
    expected = {
        "ignore": [[nan] * 5, [nan] * 5, [0, 1, nan, 1, 0]],
        "ones": [[0] * 5, [1] * 5, [0, 1, 0, 1, 0]],
        "zeros": [[0] * 5, [0] * 5, [0, 1, 0, 1, 0]],
    }
    for policy, want in expected.items():
        table = read_labels(csv, uncertain=policy)
        assert table.format == "chexpert" and table.diseases == CHEXPERT5
        np.testing.assert_array_equal(table.raw.to_numpy(), raw)
        labels = table.labels()
        assert labels.dtype == np.float32 and labels.shape == (3, 5)
        np.testing.assert_array_equal(labels, np.array(want, dtype=np.float32))


def test_chexpert_split_patient_and_paths(tmp_path):
    folder = tmp_path / "CheXpert-v1.0-small"
    extra = [chexpert_row("somewhere/patient00077/study1/view1_frontal.jpg", Edema="1.0")]
    table = read_labels(write_chexpert(folder, extra_rows=extra))
    frame = table.frame
    assert list(frame.columns[:3]) == ["image", "split", "patient"]
    assert list(frame["split"][:3]) == ["train", "train", "val"]
    assert frame["split"][3] == patient_split("patient00077")
    assert list(frame["patient"]) == ["patient00001", "patient00002", "patient64541", "patient00077"]
    # the CSV sits inside CheXpert-v1.0-small/ and Path repeats that folder: it is not doubled
    assert frame["image"][0] == str(folder / "train/patient00001/study1/view1_frontal.jpg")
    assert frame["image"][3] == str(folder / "somewhere/patient00077/study1/view1_frontal.jpg")
    rooted = read_labels(write_chexpert(folder), image_root=tmp_path)
    assert rooted.frame["image"][0] == str(tmp_path / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")


def test_csv_gz_and_disease_selection(tmp_path):
    plain = write_chexpert(tmp_path)
    gz = tmp_path / "train.csv.gz"
    gz.write_bytes(gzip.compress(open(plain, "rb").read()))
    table = read_labels(gz, diseases=["edema", "Cardiomegaly"])
    assert table.diseases == ("edema", "Cardiomegaly") and list(table.frame.columns[-2:]) == ["edema", "Cardiomegaly"]
    np.testing.assert_array_equal(table.raw.to_numpy(), [[np.nan, np.nan], [-1, -1], [1, 1]])
    assert read_labels(gz, diseases="chexpert14").diseases == CHEXPERT14
    assert read_labels(gz, diseases="Effusion").raw.iloc[2, 0] == 0  # Effusion = Pleural Effusion
    with pytest.raises(RetuneError, match="no label column for 'Hernia'.*available: No Finding"):
        read_labels(gz, diseases="Edema,Hernia")


def test_bad_csvs_name_the_file_and_problem(tmp_path):
    bad_value = write_chexpert(tmp_path / "a", extra_rows=[chexpert_row("train/patient9/s/v.jpg", Edema="maybe")])
    with pytest.raises(RetuneError, match=r"train.csv: column 'Edema' has value 'maybe' in data row 4"):
        read_labels(bad_value)
    out_of_range = write_chexpert(tmp_path / "b", extra_rows=[chexpert_row("train/patient9/s/v.jpg", Edema="2")])
    with pytest.raises(RetuneError, match="'Edema'.*1 \\(positive\\), 0 \\(negative\\), -1 \\(uncertain\\)"):
        read_labels(out_of_range)
    no_path = tmp_path / "nopath.csv"
    no_path.write_text("Sex,Edema\nMale,1\n")
    with pytest.raises(RetuneError, match=r"nopath.csv lacks column\(s\) \['Path'\].*expected columns: Path, Sex"):
        read_labels(no_path, format="chexpert")
    with pytest.raises(RetuneError, match="(?s)cannot tell the format.*--format"):
        read_labels(no_path)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 50)
    with pytest.raises(RetuneError, match="binary.csv"):
        read_labels(binary)
    with pytest.raises(RetuneError, match="not found"):
        read_labels(tmp_path / "absent.csv")
    with pytest.raises(RetuneError, match="unknown label format"):
        read_labels(write_chexpert(tmp_path), format="padchest")
    with pytest.raises(RetuneError, match="uncertain policy"):
        read_labels(write_chexpert(tmp_path), uncertain="half")


NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


def write_nih(folder, rows) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{img},{findings},0,{pid},57,M,PA,2682,2749,0.143,0.143" for img, findings, pid in rows]
    path = folder / "Data_Entry_2017.csv"
    path.write_text("\n".join([NIH_HEADER, *lines]) + "\n")
    return str(path)


def test_nih_labels_aliases_images_and_lists(tmp_path):
    rows = [("00000001_000.png", "Cardiomegaly", 1), ("00000001_001.png", "Cardiomegaly|Emphysema", 1),
            ("00000002_000.png", "No Finding", 2), ("00000003_000.png", "Effusion|Pleural_Thickening|Hernia", 3)]
    csv = write_nih(tmp_path, rows)
    (tmp_path / "images_001/images").mkdir(parents=True)
    (tmp_path / "images_001/images/00000001_000.png").write_bytes(b"x")
    table = read_labels(csv)
    assert table.format == "nih" and table.diseases == NIH14
    assert not table.frame[list(NIH14)].isna().any().any()  # every disease labelled
    labels = table.labels()
    assert labels[1, NIH14.index("Emphysema")] == 1 and labels[1].sum() == 2 and labels[2].sum() == 0
    assert labels[3, [NIH14.index(d) for d in ("Effusion", "Pleural_Thickening", "Hernia")]].tolist() == [1, 1, 1]
    assert table.frame["image"][0] == str(tmp_path / "images_001/images/00000001_000.png")
    assert table.frame["image"][2] == str(tmp_path / "00000002_000.png")  # not found: reported by check
    assert table.frame["patient"].tolist() == ["1", "1", "2", "3"]
    assert table.frame["split"][0] == table.frame["split"][1] == patient_split("1")  # split by patient

    picked = read_labels(csv, diseases=["Pleural Effusion", "pleural thickening", "No Finding"])
    assert picked.labels().tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 1], [1, 1, 0]]

    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000002_000.png\n")
    (tmp_path / "test_list.txt").write_text("00000003_000.png\n")
    splits = read_labels(csv).frame["split"].tolist()
    assert splits[3] == "test" and set(splits[:3]) <= {"train", "val"} and splits[0] == splits[1]


def test_nih_unknown_finding_is_noted(tmp_path):
    table = read_labels(write_nih(tmp_path, [("a.png", "Cardiomegaly|Covid", 1)]), diseases=["Covid"])
    assert table.labels().tolist() == [[1.0]]
    assert "unknown findings in Finding Labels: Covid" in table.notes[0]


def write_mimic(folder, with_metadata=True, with_split=True) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    labels = pd.DataFrame({"subject_id": [10000032, 10000032, 10000764, 10000898],
                           "study_id": [50414267, 53189527, 57375967, 50771383]})  # the last has no image
    for c in CHEXPERT14:
        labels[c] = np.nan
    labels.loc[0, "Edema"], labels.loc[1, "Edema"], labels.loc[2, "Cardiomegaly"] = 1.0, -1.0, 0.0
    labels.to_csv(folder / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    meta = pd.DataFrame({"dicom_id": ["02aa804e", "174413ec", "2a2277a9", "deadbeef"],
                         "subject_id": [10000032, 10000032, 10000032, 10000764],
                         "study_id": [50414267, 50414267, 53189527, 57375967],
                         "ViewPosition": ["PA", "LATERAL", "PA", "AP"]})
    if with_metadata:
        meta.to_csv(folder / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    if with_split:
        meta.assign(split=["train", "train", "validate", "test"]).drop(columns="ViewPosition").to_csv(
            folder / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    return str(folder / "mimic-cxr-2.0.0-chexpert.csv.gz")


def test_mimic_with_metadata_and_split(tmp_path):
    table = read_labels(write_mimic(tmp_path))
    assert table.format == "mimic" and len(table) == 4
    assert table.notes == ("1 labelled studies have no image in mimic-cxr-2.0.0-metadata.csv.gz and were left out",)
    assert table.frame["image"][0] == str(tmp_path / "files/p10/p10000032/s50414267/02aa804e.jpg")
    assert table.frame["split"].tolist() == ["train", "train", "val", "test"]
    assert table.frame["patient"].tolist() == ["10000032"] * 3 + ["10000764"]
    edema = table.raw["Edema"].tolist()
    assert edema[:3] == [1.0, 1.0, -1.0] and np.isnan(edema[3])


def test_mimic_without_metadata_is_one_row_per_study(tmp_path):
    labels = write_mimic(tmp_path / "labels", with_metadata=False, with_split=False)
    table = read_labels(labels, uncertain="zeros")
    assert len(table) == 4 and "metadata" in table.notes[0]
    assert table.frame["image"][2] == str(tmp_path / "labels/files/p10/p10000764/s57375967")
    assert table.frame["split"][0] == patient_split("10000032")
    assert table.frame["Edema"].tolist() == [1.0, 0.0, 0.0, 0.0]
    write_mimic(tmp_path / "meta", with_split=False)
    explicit = read_labels(labels, metadata=tmp_path / "meta/mimic-cxr-2.0.0-metadata.csv.gz")
    assert len(explicit) == 4 and explicit.frame["image"][3].endswith("s57375967/deadbeef.jpg")


def test_chestmnist_npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 14), dtype=np.uint8)
    path = tmp_path / "chestmnist.npz"
    np.savez_compressed(path, **arrays)
    table = read_labels(path, diseases=["Pleural Effusion", "Hernia"])
    assert table.format == "chestmnist" and len(table) == 10
    assert table.frame["split"].tolist() == ["train"] * 5 + ["val"] * 2 + ["test"] * 3
    assert table.frame["image"][7] == f"{path}::test_images::0"
    expected = np.concatenate([arrays[f"{s}_labels"] for s in ("train", "val", "test")])[:, [2, 13]]
    np.testing.assert_array_equal(table.labels(), expected)
    assert np.array_equal(np.asarray(load_image(table.frame["image"][7])), arrays["test_images"][0])
    np.savez(tmp_path / "other.npz", train_labels=np.zeros((2, 3)))
    with pytest.raises(RetuneError, match="not a ChestMNIST archive"):
        read_labels(tmp_path / "other.npz")


def test_manifest(tmp_path):
    (tmp_path / "m.npz").write_bytes(b"")
    csv = tmp_path / "manifest.csv"
    csv.write_text("image,split,patient,hospital,Edema,Pneumonia\n"
                   "imgs/a.png,train,007,H1,1,-1\n"
                   "/abs/b.png,validation,008,H2,0,\n"
                   "m.npz::test_images::3,,009,H1,,1\n")
    table = read_labels(csv, uncertain="ones", allow_outside_paths=True)  # /abs/b.png lies outside tmp_path
    assert table.format == "manifest" and table.diseases == ("Edema", "Pneumonia")
    assert list(table.frame.columns) == ["image", "split", "patient", "hospital", "Edema", "Pneumonia"]
    assert table.frame["image"].tolist() == [str(tmp_path / "imgs/a.png"), "/abs/b.png",
                                             f"{tmp_path}/m.npz::test_images::3"]
    assert table.frame["split"].tolist() == ["train", "val", patient_split("009")]
    assert table.frame["patient"].tolist() == ["007", "008", "009"]  # ids stay strings
    assert table.frame["hospital"].tolist() == ["H1", "H2", "H1"]
    assert table.labels().tolist() == [[1, 1], [0, 0], [0, 1]]
    assert table.raw["Pneumonia"].tolist()[:1] == [-1]

    csv.write_text("path,split,Edema\na.png,holdout,1\n")
    with pytest.raises(RetuneError, match=r"unknown split value\(s\) \['holdout'\]"):
        read_labels(csv)
    csv.write_text("path,site,Edema\na.png,Boston,1\n")
    with pytest.raises(RetuneError, match="column 'site' has value 'Boston'.*--diseases"):
        read_labels(csv)
    assert read_labels(csv, diseases="Edema").labels().tolist() == [[1.0]]


def test_detect_format(tmp_path):
    assert detect_format(tmp_path / "chestmnist_224.npz") == "chestmnist"
    assert detect_format(Path(write_chexpert(tmp_path / "c"))) == "chexpert"
    assert detect_format(Path(write_nih(tmp_path / "n", [("a.png", "Mass", 1)]))) == "nih"
    assert detect_format(Path(write_mimic(tmp_path / "m"))) == "mimic"
    manifest = tmp_path / "x.csv"
    manifest.write_text("Image,Edema\na.png,1\n")
    assert detect_format(manifest) == "manifest"


def test_split_is_deterministic_and_about_80_10_10(tmp_path):
    ids = [f"patient{i:05d}" for i in range(5000)]
    splits = [patient_split(i) for i in ids]
    assert splits == [patient_split(i) for i in ids]
    assert patient_split("patient00001") == patient_split("patient00001")
    counts = pd.Series(splits).value_counts(normalize=True)
    assert abs(counts["train"] - 0.8) < 0.03 and abs(counts["val"] - 0.1) < 0.02 and abs(counts["test"] - 0.1) < 0.02
    # the split of a manifest does not depend on where the images live
    csv = tmp_path / "m.csv"
    csv.write_text("image,Edema\n" + "".join(f"img{i}.png,1\n" for i in range(50)))
    a = read_labels(csv).frame["split"].tolist()
    assert a == read_labels(csv, image_root=tmp_path / "elsewhere").frame["split"].tolist()
    assert a == [patient_split(f"img{i}.png") for i in range(50)]


def test_apply_uncertain_table():
    raw = pd.DataFrame({"d": [1.0, 0.0, -1.0, np.nan]})
    assert apply_uncertain(raw, "ignore")["d"].tolist()[:2] == [1.0, 0.0]
    assert apply_uncertain(raw, "ignore")["d"].isna().tolist() == [False, False, True, True]
    assert apply_uncertain(raw, "ones")["d"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert apply_uncertain(raw, "zeros")["d"].tolist() == [1.0, 0.0, 0.0, 0.0]
