"""`retune data check` through typer's CliRunner: JSON on stdout, exit 2 with a red message on a RetuneError."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from deploy.cli_data import data_app

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
