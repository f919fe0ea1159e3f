"""`retune predict --report`: a drafted FINDINGS/IMPRESSION report per image, in the table output and in the JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deploy.drafts import BankIndex, choose_bank
from deploy.inference import Scored
from research.phantom import write_phantom
from research.report_bank import phantom_bank
from shared.errors import RetuneError
from shared.reports import IU_SOURCE, SentenceBank, build_bank, canonical

runner = CliRunner()


def bank_sentences(text: str, bank: SentenceBank) -> list[int]:
    """The bank rows a draft section was joined from (every piece must be a bank sentence, longest match first)."""
    rows, rest = [], text
    by_length = sorted(range(len(bank)), key=lambda i: -len(bank.texts[i]))
    while rest:
        row = next((i for i in by_length if rest == bank.texts[i] or rest.startswith(bank.texts[i] + " ")), None)
        assert row is not None, f"not a bank sentence: {rest!r}"
        rows.append(row)
        rest = rest[len(bank.texts[row]) + 1:]
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from deploy.cli import app

    tmp = tmp_path_factory.mktemp("report")
    manifest = write_phantom(tmp / "data", 12, size=64)
    common = ["--cache", str(tmp / "cache")]
    result = runner.invoke(app, ["train", "--data", str(manifest), "--out", str(tmp / "ck"), "--epochs", "1",
                                 "--backbone", "retune-tiny-random", *common])
    assert result.exit_code == 0, result.output
    images = [str(tmp / "data/images/h0_000000.png"), str(tmp / "data/images/h0_000001.png"), str(tmp / "missing.png")]
    return images, ["predict", *images, "--checkpoint", str(tmp / "ck"), "--report", *common]


def test_predict_report(trained, monkeypatch):
    from deploy.cli import app

    monkeypatch.setenv("COLUMNS", "1000")  # rich wraps at 80 columns off a terminal
    images, args = trained
    # The one-epoch random-backbone checkpoint scores every finding negative: set two probabilities of the first image
    # (Cardiomegaly at the threshold itself) so that its draft has positive findings too (the printed probabilities
    # and the drafts both read Scored.probabilities).
    def probabilities(self: Scored) -> np.ndarray:
        out = torch.sigmoid(torch.as_tensor(self.logits)).numpy().copy()
        out[0, [1, 4]] = 0.5, 0.7
        return out

    monkeypatch.setattr(Scored, "probabilities", property(probabilities))
    result = runner.invoke(app, [*args, "--bank", "phantom", "--json"])
    assert result.exit_code == 0, result.output
    assert "report bank: phantom (--bank phantom)" in result.stderr
    out = json.loads(result.stdout)
    assert out["bank"]["name"] == "phantom" and out["bank"]["sentences"] > 100
    assert out["images"][images[2]] is None
    assert [sorted(d for d, p in out["images"][i]["probabilities"].items() if p >= 0.5) for i in images[:2]] == [
        ["Cardiomegaly", "Pleural Effusion"], []]  # both polarities and both kinds of IMPRESSION are exercised
    bank = phantom_bank()  # the phantom bank's tags are exact: what each chosen sentence says is known
    for image in images[:2]:
        probabilities, report = out["images"][image]["probabilities"], out["images"][image]["report"]
        assert len(probabilities) == 5 and set(report) == {"findings", "impression"}
        assert report["findings"] and report["impression"], report
        want = {canonical(d): "positive" if p >= 0.5 else "negative" for d, p in probabilities.items()}
        findings, impression = bank_sentences(report["findings"], bank), bank_sentences(report["impression"], bank)
        for row in findings + impression:  # every chosen sentence agrees with every printed probability
            for disease, polarity in bank.tags[row].items():
                assert want.get(disease) == polarity, (bank.texts[row], disease, polarity, probabilities)
        index = BankIndex(bank, tuple(probabilities))
        wanted = [1 if want[canonical(d)] == "positive" else -1 for d in probabilities]
        agreeing = index.agreeing(wanted) & index.in_section["findings"]
        said = {d for row in findings for d in bank.tags[row]}
        for c, disease in enumerate(map(canonical, probabilities)):  # each disease said, or the bank cannot say it
            assert disease in said or not (agreeing & (index.polarity[:, c] != 0)).any(), (disease, report)
        positive = [d for d, w in want.items() if w == "positive"]
        if positive:  # IMPRESSION restates the positive findings
            assert {d for row in impression for d in bank.tags[row]} == set(positive), (report, probabilities)
        else:  # or states a normal study
            assert [bank.normal[row] for row in impression] == [True], report

    table = runner.invoke(app, [*args, "--bank", "phantom"])
    assert table.exit_code == 0, table.output
    report = out["images"][images[0]]["report"]
    assert f"FINDINGS: {report['findings']}" in table.stdout and f"IMPRESSION: {report['impression']}" in table.stdout
    assert "licence: this project's own text" in table.stderr

    plain = runner.invoke(app, [*args[:-3], *args[-2:], "--json"])
    assert set(json.loads(plain.stdout)) == set(images)  # without --report: the probabilities alone, as before

    wrong = runner.invoke(app, [*args, "--bank", "mimic"])
    assert wrong.exit_code != 0 and "unknown report bank 'mimic'" in str(wrong.exception)


def test_default_bank_is_iu_where_torchxrayvision_ships_it(trained, monkeypatch, tmp_path):
    """Without --bank: the IU bank when the torchxrayvision archive is there (a small stand-in bank here, so that
    the test embeds a few sentences, not 6,400), the phantom bank when it is not; stderr says which and why."""
    import shared.reports
    from deploy.cli import app

    monkeypatch.setenv("COLUMNS", "1000")
    args = trained[1]
    archive = tmp_path / "NLMCXR_reports.tgz"
    archive.touch()
    monkeypatch.setattr("deploy.drafts.iu_archive", lambda: archive)
    findings = ("No pleural effusion. Heart size is normal. The heart is enlarged. Large left pleural effusion. "
                "No edema. Pulmonary edema.")
    stand_in = build_bank([("findings", findings),
                           ("impression", "No acute cardiopulmonary abnormality.")], IU_SOURCE)
    monkeypatch.setattr(shared.reports, "iu_bank", lambda: stand_in)
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert "report bank: iu (auto: torchxrayvision is installed" in result.stderr
    assert "licence: CC BY-NC-ND 4.0" in result.stderr
    out = json.loads(result.stdout)
    assert out["bank"] == {**IU_SOURCE, "sentences": len(stand_in)}

    def missing() -> None:
        raise RetuneError("the Indiana University report bank needs torchxrayvision")

    monkeypatch.setattr("deploy.drafts.iu_archive", missing)
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert "report bank: phantom (auto: torchxrayvision is not installed" in result.stderr
    assert json.loads(result.stdout)["bank"]["name"] == "phantom"
    assert choose_bank("iu") == ("iu", "--bank iu")  # an explicit choice stands
    with pytest.raises(RetuneError, match="unknown report bank 'auto2'"):
        choose_bank("auto2")
