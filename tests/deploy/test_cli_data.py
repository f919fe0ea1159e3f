"""`retune data check` through typer's CliRunner: JSON on stdout, exit 2 with a red message on a RetuneError."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from deploy.cli_data import data_app
from tests.shared.data.hostile import huge_png

runner = CliRunner()


def write_manifest(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"garbage" * 10)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,split,Edema,Cardiomegaly\na.png,train,1,-1\nbad.png,test,0,\nmissing.png,val,-1,1\n")
    return csv


def test_check_prints_json_summary(tmp_path):
    csv = write_manifest(tmp_path)
    result = runner.invoke(data_app, ["check", str(csv)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert result.stdout.startswith("{\n  ")  # indent 2
    assert summary["format"] == "manifest" and summary["rows"] == 3
    assert (summary["images_found"], summary["missing"], summary["corrupt"]) == (1, 1, 1)
    assert summary["diseases"]["Cardiomegaly"] == {"positive": 1, "negative": 0, "uncertain": 1, "blank": 1}


def test_check_options(tmp_path):
    csv = write_manifest(tmp_path)
    args = ["check", str(csv), "--format", "manifest", "--diseases", "Cardiomegaly", "--uncertain", "zeros",
            "--no-verify", "--image-root", str(tmp_path)]
    result = runner.invoke(data_app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert list(summary["diseases"]) == ["Cardiomegaly"] and summary["uncertain_policy"] == "zeros"
    assert (summary["images_found"], summary["missing"], summary["corrupt"]) == (2, 1, 0)


def test_check_errors_exit_2_with_message(tmp_path):
    result = runner.invoke(data_app, ["check", str(tmp_path / "nope.csv")])
    assert result.exit_code == 2 and result.stdout == ""
    assert "error:" in result.stderr and "nope.csv not found" in result.stderr
    csv = write_manifest(tmp_path)
    result = runner.invoke(data_app, ["check", str(csv), "--diseases", "Hernia"])
    assert result.exit_code == 2 and "no label column for 'Hernia'" in result.stderr
    result = runner.invoke(data_app, ["check", str(csv), "--format", "padchest"])
    assert result.exit_code == 2 and "padchest" in result.output  # typer's own usage error


HEADER = "image,split,Atelectasis,Cardiomegaly,Consolidation,Edema,Pleural Effusion"


def hospital(folder: Path, *rows: str) -> Path:
    """Eight 16 px PNGs (six train, two test) and a manifest with extra ``rows``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = [HEADER]
    for i in range(8):
        Image.fromarray(np.full((16, 16), 30 * i, np.uint8)).save(folder / "images" / f"{i}.png")
        lines.append(f"images/{i}.png,{'train' if i < 6 else 'test'},{i % 2},{(i + 1) % 2},0,1,{i // 4}")
    csv = folder / "labels.csv"
    csv.write_text("\n".join([*lines, *rows]) + "\n")
    return csv


def one_error_line(result) -> str:
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.output, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


BAD_LABEL_FILES = {
    "misspelled disease": (lambda csv: csv.write_text(csv.read_text().replace("Cardiomegaly", "Cardiomegally")),
                           "unknown disease column 'Cardiomegally' (did you mean 'Cardiomegaly'?)"),
    "repeated column": (lambda csv: csv.write_text(csv.read_text().replace("Consolidation", "Edema")),
                        "column 'Edema' appears twice in the header (columns 5 and 6): keep one"),
    "NaN label": (lambda csv: csv.write_text(csv.read_text().replace("images/3.png,train,1", "images/3.png,train,NaN")),
                  "column 'Atelectasis' has value 'NaN' in data row 4"),
    "latin-1 bytes": (lambda csv: csv.write_bytes(csv.read_bytes() + "M\u00fcller.png,train,1,0,0,1,0\n".encode("latin-1")),
                      "is not UTF-8 text: byte 0xfc at byte offset"),
    "path out of the folder": (lambda csv: csv.write_text(csv.read_text() + "../../etc/passwd,train,1,0,0,1,0\n"),
                               "1 image path(s) lead outside the data folder"),
    "absolute path": (lambda csv: csv.write_text(csv.read_text() + "/etc/hostname,test,1,0,0,1,0\n"),
                      "e.g. /etc/hostname; refused"),
}


@pytest.mark.parametrize("case", BAD_LABEL_FILES)
def test_a_bad_label_file_is_one_error_line(tmp_path, case):
    spoil, expected = BAD_LABEL_FILES[case]
    csv = hospital(tmp_path)
    spoil(csv)
    assert expected in one_error_line(runner.invoke(data_app, ["check", str(csv)]))


def test_check_reports_bombs_leaks_and_empty_splits_and_takes_its_options(tmp_path):
    huge_png(tmp_path / "bomb.png", 20000, 20000)
    huge_png(tmp_path / "big.png", 12000, 12000)
    csv = hospital(tmp_path, "bomb.png,train,1,0,0,1,0", "big.png,test,1,0,0,1,0", "images/0.png,test,1,0,0,1,0")
    result = runner.invoke(data_app, ["check", str(csv)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    summary = json.loads(result.stdout)
    assert summary["bad_files"] == {"too large": 2} and summary["corrupt"] == 2
    assert [e["detail"] for e in summary["examples"]] == [
        "more than 178,956,970 pixels, over the limit of 40,000,000 (max_pixels)",
        "12000 x 12000 pixels, over the limit of 40,000,000 (max_pixels)"]
    assert summary["split_overlap"]["count"] == 1
    assert result.stderr.splitlines() == [f"warning: {summary['warnings'][0]}"]
    assert "images/0.png in train and test with different labels: training refuses this" in result.stderr

    small = json.loads(runner.invoke(data_app, ["check", str(csv), "--max-pixels", "255"]).stdout)
    assert small["bad_files"] == {"too large": 11} and len(small["warnings"]) == 3  # overlap, no train, no test
    refused = runner.invoke(data_app, ["check", str(csv), "--max-pixels", "0"])
    assert refused.exit_code == 2 and "x>=1" in refused.output  # typer's own usage error

    outside = hospital(tmp_path / "other", f"{tmp_path}/images/0.png,train,1,0,0,1,0")
    one_error_line(runner.invoke(data_app, ["check", str(outside)]))
    allowed = runner.invoke(data_app, ["check", str(outside), "--allow-outside-paths"])
    assert allowed.exit_code == 0 and json.loads(allowed.stdout)["images_found"] == 9


def test_embed_train_and_predict_skip_a_bomb_and_train_refuses_a_leak(tmp_path, capsys, monkeypatch):
    from deploy.cli import app, main

    huge_png(tmp_path / "bomb.png", 20000, 20000)
    csv = hospital(tmp_path, "bomb.png,train,1,0,0,1,0")
    common = ["--backbone", "retune-tiny-random", "--cache", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, ["embed", "--data", str(csv), *common])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{"):])["bad_files"]["by_reason"] == {"too large": 1}
    result = CliRunner().invoke(app, ["train", "--data", str(csv), "--out", str(tmp_path / "out"), "--epochs", "1",
                                      *common])
    assert result.exit_code == 0 and "too large" in result.output, result.output
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "bomb.png"), str(tmp_path / "images/0.png"),
                                      "--checkpoint", str(tmp_path / "out"), "--json", "--cache", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout[result.stdout.index("{"):])
    assert predictions[str(tmp_path / "bomb.png")] is None and len(predictions[str(tmp_path / "images/0.png")]) == 5

    leak = hospital(tmp_path / "leak", "images/0.png,test,1,0,0,1,0")
    monkeypatch.setenv("COLUMNS", "1000")  # rich wraps at 80 columns off a terminal
    monkeypatch.setattr(sys, "argv", ["retune", "train", "--data", str(leak), "--out", str(tmp_path / "o2"), *common])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"error: {leak}: 1 image(s) are in more than one split")
