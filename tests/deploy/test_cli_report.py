"""`retune predict --report`: a drafted FINDINGS/IMPRESSION report per image, in the table output and in the JSON."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from research.phantom import write_phantom
from shared.reports import tag_sentence

runner = CliRunner()


def test_predict_report(tmp_path, monkeypatch):
    from deploy.cli import app

    monkeypatch.setenv("COLUMNS", "1000")  # rich wraps at 80 columns off a terminal
    manifest = write_phantom(tmp_path / "data", 12, size=64)
    common = ["--cache", str(tmp_path / "cache")]
    trained = runner.invoke(app, ["train", "--data", str(manifest), "--out", str(tmp_path / "ck"), "--epochs", "1",
                                  "--backbone", "retune-tiny-random", *common])
    assert trained.exit_code == 0, trained.output
    images = [str(tmp_path / "data/images/h0_000000.png"), str(tmp_path / "missing.png")]
    args = ["predict", *images, "--checkpoint", str(tmp_path / "ck"), "--report", *common]

    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["bank"]["name"] == "phantom" and out["bank"]["sentences"] > 100
    assert out["images"][images[1]] is None
    entry = out["images"][images[0]]
    probabilities, report = entry["probabilities"], entry["report"]
    assert len(probabilities) == 5 and report["findings"] and report["impression"]
    for disease, p in probabilities.items():  # what the draft says about a finding agrees with its probability
        said = {tag_sentence(s + ".").get(disease) for s in report["findings"].split(". ")} - {None}
        assert said <= {"positive" if p >= 0.5 else "negative"}, (disease, p, report)

    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    assert f"FINDINGS: {report['findings']}" in table.stdout and f"IMPRESSION: {report['impression']}" in table.stdout
    assert "licence: this project's own text" in table.stderr

    plain = runner.invoke(app, [*args[:-3], *common, "--json"])
    assert set(json.loads(plain.stdout)) == set(images)  # without --report: the probabilities alone, as before

    wrong = runner.invoke(app, [*args, "--bank", "mimic"])
    assert wrong.exit_code != 0 and "unknown report bank 'mimic'" in str(wrong.exception)
