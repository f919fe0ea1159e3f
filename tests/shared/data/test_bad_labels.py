"""Hostile label files: misspelled or repeated disease columns, text where a label belongs, non-UTF-8 bytes and
image paths that lead out of the data folder. Each is one RetuneError naming the file and the problem."""

from __future__ import annotations

import gzip
import os

import pytest

from shared.data.readers import read_labels
from shared.errors import RetuneError
from shared.labels import NIH14

HEADER = "image,split,Atelectasis,Cardiomegaly,Edema"


def write(tmp_path, text: str, name: str = "labels.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("header,typo,meant", [
    ("image,split,Atelectasis,Cardiomegally,Edema", "Cardiomegally", "Cardiomegaly"),
    ("image,split,Atelectasis,Cardiomegaly,Edma", "Edma", "Edema"),
    ("image,split,Pleural_Efusion,Cardiomegaly,Edema", "Pleural_Efusion", "Pleural Effusion"),
])
def test_a_misspelled_disease_column_names_the_disease_it_resembles(tmp_path, header, typo, meant):
    csv = write(tmp_path, f"{header}\na.png,train,1,0,1\n")
    message = f"labels.csv: unknown disease column {typo!r} (did you mean {meant!r}?)"
    with pytest.raises(RetuneError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        read_labels(csv)
    with pytest.raises(RetuneError, match="did you mean"):
        read_labels(csv, diseases="Atelectasis")  # also when the misspelled column is not asked for


def test_columns_that_are_not_diseases_or_are_named_on_purpose_still_work(tmp_path):
    csv = write(tmp_path, "image,split,patient,Sex,Age,View Position,Covid,Nodules\na.png,train,p1,F,61,PA,1,0\n")
    table = read_labels(csv, diseases="Covid,Nodules")  # Nodules is a disease of its own, asked for by name
    assert table.diseases == ("Covid", "Nodules") and table.labels().tolist() == [[1.0, 0.0]]
    with pytest.raises(RetuneError, match=r"unknown disease column 'Nodules' \(did you mean 'Nodule'\?\)"):
        read_labels(csv)  # not asked for, it would silently never meet the federation's Nodule
    csv = write(tmp_path, f"{HEADER}\na.png,train,1,0,1\n")
    with pytest.raises(RetuneError, match=r"no label column for 'Cardiomegally' \(did you mean 'Cardiomegaly'\?\)"):
        read_labels(csv, diseases="Edema,Cardiomegally")  # a misspelled --diseases


def test_misspelled_chexpert_column_and_nih_finding(tmp_path):
    chexpert = write(tmp_path, "Path,Sex,Age,Frontal/Lateral,AP/PA,Atelectasis,Cardiomegaly,Consolidation,Edema,"
                               "Pleural Effusion,Pneumothorx\ntrain/patient1/s/v.jpg,F,50,Frontal,AP,1,0,0,1,0,1\n")
    with pytest.raises(RetuneError, match=r"unknown disease column 'Pneumothorx' \(did you mean 'Pneumothorax'\?\)"):
        read_labels(chexpert)
    nih = write(tmp_path, "Image Index,Finding Labels,Patient ID\na.png,Cardiomegally|Mass,1\n", "Data_Entry.csv")
    with pytest.raises(RetuneError, match=r"unknown finding in Finding Labels 'Cardiomegally' \(did you mean "
                                          r"'Cardiomegaly'\?\)"):
        read_labels(nih)
    write(tmp_path, "Image Index,Finding Labels,Patient ID\na.png,Cardiomegaly|Covid,1\n", "Data_Entry.csv")
    assert read_labels(nih).diseases == NIH14  # an unknown finding unlike any disease is only noted


@pytest.mark.parametrize("header", ["image,split,Edema,Cardiomegaly,Edema", "image,split,Edema,Cardiomegaly, edema",
                                    "path,split,Pleural Effusion,Pleural_Effusion"])
def test_a_column_named_twice_is_an_error(tmp_path, header):
    csv = write(tmp_path, f"{header}\na.png,train,1,0,1\n")
    with pytest.raises(RetuneError, match=r"labels.csv: column '.*' appears twice in the header \(columns 3 and"):
        read_labels(csv)


@pytest.mark.parametrize("value", ["NaN", "nan", "NA", "N/A", "null", "None", "inf", "-nan", "yes", "2", "0.5"])
def test_a_label_outside_1_0_minus1_blank_names_its_row_and_column(tmp_path, value):
    csv = write(tmp_path, f"{HEADER}\na.png,train,1,,0\nb.png,train,-1,{value},1.0\n")
    with pytest.raises(RetuneError, match=f"labels.csv: column 'Cardiomegaly' has value '{value}' in data row 2; "
                                          r"label columns hold 1 \(positive\), 0 \(negative\), -1 \(uncertain\) or "
                                          r"blank \(an empty cell\)"):
        read_labels(csv)


def test_empty_cells_are_blank_and_text_ids_stay_text(tmp_path):
    csv = write(tmp_path, "image,split,patient,Atelectasis,Cardiomegaly,Edema\na.png,train,NA,1, ,-1.0\n")
    table = read_labels(csv)
    assert table.frame["patient"].tolist() == ["NA"]  # a patient id, not a missing value
    assert table.raw.iloc[0].tolist()[:1] == [1.0] and table.raw.isna().iloc[0].tolist() == [False, True, False]


@pytest.mark.parametrize("compress", [False, True])
def test_non_utf8_csv_names_the_file_byte_and_line(tmp_path, compress):
    data = "image,split,Edema\na.png,train,1\nM\u00fcller.png,test,0\n".encode("latin-1")
    path = tmp_path / ("labels.csv.gz" if compress else "labels.csv")
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(RetuneError) as err:
        read_labels(path)
    assert str(err.value) == (f"{path} is not UTF-8 text: byte 0xfc at byte offset 33 (line 3) cannot be decoded; "
                              "save the file as UTF-8 (e.g. Excel's 'CSV UTF-8')")
    (tmp_path / "bom.csv").write_bytes("image,split,Edema\na.png,train,1\n".encode("utf-8-sig"))
    assert read_labels(tmp_path / "bom.csv").diseases == ("Edema",)  # Excel's UTF-8 with a byte-order mark


def test_image_paths_outside_the_data_folder_are_refused_unless_allowed(tmp_path):
    data = tmp_path / "hospital"
    (data / "images").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", data / "images" / "out")
    os.symlink(data / "images", data / "inside-link")
    cases = {"../../etc/passwd": f"{data}/../../etc/passwd -> {os.path.realpath(tmp_path.parent / 'etc/passwd')}",
             "/etc/passwd": "/etc/passwd",
             "images/out/x.png": f"{data}/images/out/x.png -> {tmp_path}/elsewhere/x.png",
             "images/../../elsewhere/m.npz::test_images::0":
                 f"{data}/images/../../elsewhere/m.npz::test_images::0 -> {tmp_path}/elsewhere/m.npz"}
    for ref, shown in cases.items():
        csv = write(data, f"image,split,Edema\nimages/a.png,train,1\n{ref},test,0\n")
        with pytest.raises(RetuneError) as err:
            read_labels(csv)
        assert str(err.value).startswith(f"{csv}: 1 image path(s) lead outside the data folder {data}, e.g. "
                                         f"{shown}; refused: point the image root")
        assert len(read_labels(csv, allow_outside_paths=True)) == 2
    csv = write(data, "image,split,Edema\ninside-link/a.png,train,1\nimages/./b/../c.png,test,0\n")
    assert len(read_labels(csv)) == 2  # a symlink that stays inside, and '..' that stays inside, are fine
    csv = write(data, "image,split,Edema\n/etc/hostname,test,0\n")
    assert len(read_labels(csv, image_root="/etc")) == 1  # the image root says where the images may be
