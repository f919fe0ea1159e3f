"""check_dataset: image counts on a small manifest, and exact label counts on the real CheXpert and NIH CSVs."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import shared.data.check as check_module
from shared.data.check import check_dataset
from shared.labels import CHEXPERT5, NIH14


def real_csv(name: str) -> Path:
    """A label CSV shipped in the torchxrayvision wheel, found without importing torchxrayvision."""
    try:
        path = Path(str(importlib.metadata.distribution("torchxrayvision").locate_file(f"torchxrayvision/data/{name}")))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torchxrayvision is not installed: pip install --no-deps torchxrayvision==1.5.7 for the real CSVs")
    if not path.is_file():
        pytest.skip(f"{path} is missing from the installed torchxrayvision (expected version 1.5.7)")
    return path


@pytest.fixture
def manifest(tmp_path):
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(tmp_path / "ok.png")
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "ok.jpg")
    (tmp_path / "broken.png").write_bytes(b"not really a png" * 4)
    np.savez(tmp_path / "m.npz", test_images=np.zeros((2, 8, 8), np.uint8))
    csv = tmp_path / "manifest.csv"
    csv.write_text("image,split,patient,Edema,Pneumonia\n"
                   "ok.png,train,p1,1,-1\n"
                   "ok.jpg,train,p2,0,\n"
                   "broken.png,val,p3,-1,1\n"
                   "gone.png,test,p4,,0\n"
                   "m.npz::test_images::1,test,p5,1,1\n")
    return csv


def test_check_manifest_with_verification(manifest):
    summary = check_dataset(manifest)
    assert summary["format"] == "manifest" and summary["rows"] == 5 and summary["source"] == str(manifest)
    assert (summary["images_found"], summary["missing"], summary["corrupt"]) == (3, 1, 1)
    assert summary["bad_files"] == {"corrupt": 1, "missing": 1}
    assert [(e["image"], e["reason"]) for e in summary["examples"]] == [
        (str(manifest.parent / "broken.png"), "corrupt"), (str(manifest.parent / "gone.png"), "missing")]
    assert summary["splits"] == {"train": 2, "test": 2, "val": 1}
    assert summary["diseases"] == {
        "Edema": {"positive": 2, "negative": 1, "uncertain": 1, "blank": 1},
        "Pneumonia": {"positive": 2, "negative": 1, "uncertain": 1, "blank": 1},
    }
    json.dumps(summary)  # JSON-able


def test_check_without_verification_only_looks_for_files(manifest, monkeypatch):
    monkeypatch.setattr(check_module, "PROGRESS_FROM", 1)  # exercise the progress-bar path too
    summary = check_dataset(manifest, verify_images=False, uncertain="ones", diseases="Pneumonia")
    assert (summary["images_found"], summary["missing"], summary["corrupt"]) == (4, 1, 0)
    assert summary["diseases"] == {"Pneumonia": {"positive": 2, "negative": 1, "uncertain": 1, "blank": 1}}
    assert summary["uncertain_policy"] == "ones" and summary["verified"] is False


def test_real_chexpert_counts_match_pandas():
    path = real_csv("chexpert_train.csv.gz")
    df = pd.read_csv(path)
    summary = check_dataset(path, verify_images=False)
    assert summary["format"] == "chexpert" and summary["rows"] == len(df) == 223414
    assert summary["missing"] == len(df) and summary["images_found"] == 0  # only the labels ship
    assert summary["splits"] == {"train": len(df)}
    for disease in CHEXPERT5:
        counts = df[disease].value_counts(dropna=False)
        assert summary["diseases"][disease] == {
            "positive": counts.get(1.0, 0), "negative": counts.get(0.0, 0),
            "uncertain": counts.get(-1.0, 0), "blank": int(df[disease].isna().sum()),
        }, disease
        assert sum(summary["diseases"][disease].values()) == len(df)


def test_real_nih_counts_match_pandas():
    path = real_csv("Data_Entry_2017_v2020.csv.gz")
    df = pd.read_csv(path)
    summary = check_dataset(path, verify_images=False)
    assert summary["format"] == "nih" and summary["rows"] == len(df) == 112120
    assert sum(summary["splits"].values()) == len(df)
    findings = df["Finding Labels"].str.split("|")
    for disease in NIH14:
        positive = int(df["Finding Labels"].str.contains(disease, regex=False).sum())
        assert positive == int(findings.apply(lambda f, d=disease: d in f).sum())
        assert summary["diseases"][disease] == {
            "positive": positive, "negative": len(df) - positive, "uncertain": 0, "blank": 0}, disease
    assert summary["diseases"]["Effusion"]["positive"] == 13317  # the published NIH count
