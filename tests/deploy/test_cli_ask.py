"""``retune ask`` and ``retune vqa make|evaluate`` end to end: phantom images, a checkpoint trained on them with the
tiny backbone, answers that agree with ``retune predict``, and questions it cannot answer refused in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploy.cli import app, main
from shared.labels import CHEXPERT5
from shared.prompts import disease_phrase
from shared.vqa import read_items

N_IMAGES = 16


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def stdout_json(text: str):
    return json.loads(text[text.index("{"):])


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict[str, Path]:
    """16 phantom images and a checkpoint trained on them (tiny random backbone, one epoch)."""
    root = tmp_path_factory.mktemp("vqa")
    run("phantom", "--out", str(root / "phantom"), "--n", str(N_IMAGES), "--size", "64")
    cache = root / "cache"
    run("train", "--data", str(root / "phantom/manifest.csv"), "--out", str(root / "checkpoint"), "--epochs", "1",
        "--backbone", "retune-tiny-random", "--cache", str(cache))
    return {"root": root, "data": root / "phantom", "checkpoint": root / "checkpoint", "cache": cache}


def common(site: dict[str, Path]) -> list[str]:
    return ["--checkpoint", str(site["checkpoint"]), "--cache", str(site["cache"])]


def test_ask_agrees_with_predict(site):
    images = sorted(str(p) for p in (site["data"] / "images").glob("*.png"))[:2]
    predicted = stdout_json(run("predict", *images, *common(site), "--json"))
    for image in images:
        p = predicted[image]

        def ask(question: str, image: str = image) -> dict:
            return stdout_json(run("ask", image, question, *common(site), "--json"))

        edema = ask("Is there edema?")
        assert edema["probability"] == pytest.approx(p["Edema"], abs=1e-6)
        assert edema["answer"] == ("yes" if p["Edema"] >= 0.5 else "no")
        normal = ask("Is the heart size normal?")
        assert normal["probability"] == pytest.approx(1 - p["Cardiomegaly"], abs=1e-6)
        assert normal["mapped"] == {"form": "normality", "diseases": ["Cardiomegaly"], "inverted": True,
                                    "question_type": "SIZE"}
        choice = ask("Which of these findings are present: edema, pleural effusion, atelectasis?")
        asked = ("Edema", "Pleural Effusion", "Atelectasis")
        assert choice["findings"] == pytest.approx({d: p[d] for d in asked}, abs=1e-6)
        assert choice["answer"] == (", ".join(d for d in asked if p[d] >= 0.5) or "none")
    table = run("ask", images[0], "Is there edema?", *common(site))
    assert table.split()[0] in ("yes", "no") and "P(yes) =" in table


def test_unanswerable_questions_exit_2_with_one_line(site, capsys, monkeypatch):
    image = str(next((site["data"] / "images").glob("*.png")))
    monkeypatch.setenv("COLUMNS", "1000")  # rich wraps at 80 columns off a terminal
    for question, says in (("Is there pneumothorax?", "it scores: atelectasis, cardiomegaly"),
                           ("Are the lungs clear?", "every lung finding")):
        monkeypatch.setattr(sys, "argv", ["retune", "ask", image, question, *common(site)])
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert exit_.value.code == 2 and "Traceback" not in err and len(errors) == 1 and says in errors[0], err


def test_vqa_make_and_evaluate_agree_with_predict(site):
    questions = site["root"] / "questions.json"
    run("vqa", "make", "--data", str(site["data"] / "manifest.csv"), "--out", str(questions), "--seed", "1")
    items = read_items(questions)
    assert len(items) == N_IMAGES * 7  # five presence, one heart size, one which-of per fully labelled image
    assert {i.question_type for i in items} == {"PRES", "SIZE"} and {i.answer_type for i in items} == {"CLOSED"}

    out = site["root"] / "answers.json"
    summary = stdout_json(run("vqa", "evaluate", *common(site), "--questions", str(questions), "--images",
                              str(site["data"]), "--out", str(out), "--json"))
    assert summary["answered"] == summary["questions"] == len(items) and summary["skipped"] == {}
    assert 0 <= summary["ece"] <= 1 and summary["decisions"] > len(items)
    answers = json.loads(out.read_text())["answers"]
    assert summary["accuracy"] == pytest.approx(sum(a["correct"] for a in answers) / len(answers))
    images = sorted({str(site["data"] / a["image_name"]) for a in answers})
    predicted = stdout_json(run("predict", *images, *common(site), "--json"))
    checked = 0
    for a in answers:
        p = predicted[str(site["data"] / a["image_name"])]
        named = [d for d in CHEXPERT5 if disease_phrase(d) in a["question"].lower()]
        if a["question"] == "Is the heart size normal?":
            assert a["probability"] == pytest.approx(1 - p["Cardiomegaly"], abs=1e-6)
        elif not a["question"].startswith("Which") and len(named) == 1:
            assert a["probability"] == pytest.approx(p[named[0]], abs=1e-6)
            assert a["correct"] == ((a["probability"] >= 0.5) == (a["answer"] == "yes"))
            checked += 1
    assert checked == N_IMAGES * 5
    table = run("vqa", "evaluate", *common(site), "--questions", str(questions), "--images", str(site["data"]))
    assert "question type SIZE" in table and f"{summary['accuracy']:.3f}" in table and "ECE" in table


def test_temperature_is_fitted_on_other_images_and_changes_no_answer(site, capsys, monkeypatch):
    manifest = str(site["data"] / "manifest.csv")
    fit, report = site["root"] / "fit.json", site["root"] / "report.json"
    run("vqa", "make", "--data", manifest, "--out", str(fit), "--split", "train")
    run("vqa", "make", "--data", manifest, "--out", str(report), "--split", "test")
    base = [*common(site), "--questions", str(report), "--images", str(site["data"]), "--json"]
    plain = stdout_json(run("vqa", "evaluate", *base))
    fitted = stdout_json(run("vqa", "evaluate", *base, "--calibrate-on", str(fit)))
    assert fitted["temperature"] != 1.0 and fitted["temperature_fitted_on"] == str(fit)
    assert fitted["accuracy"] == plain["accuracy"] and fitted["ece_uncalibrated"] == pytest.approx(plain["ece"])

    monkeypatch.setenv("COLUMNS", "1000")
    monkeypatch.setattr(sys, "argv", ["retune", "vqa", "evaluate", *base, "--calibrate-on", str(report)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "fit the temperature on other images" in capsys.readouterr().err


def test_make_asks_nothing_about_uncertain_or_blank_labels(tmp_path):
    rows = ["image,Atelectasis,Cardiomegaly,Consolidation,Edema,Pleural Effusion",
            "a.png,1,-1,,0,-1",  # two labelled: two presence questions and a which-of
            "b.png,-1,1,,,",  # Cardiomegaly only: presence and heart size
            "c.png,-1,-1,,,"]  # nothing labelled: no question
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    run("vqa", "make", "--data", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "q.json"))
    items = read_items(tmp_path / "q.json")
    by_image = {name: [i for i in items if i.image_name == name] for name in ("a.png", "b.png", "c.png")}
    assert [len(v) for v in by_image.values()] == [3, 2, 0]
    assert {i.answer for i in by_image["a.png"][-1:]} <= {"Atelectasis", "none"}  # edema is labelled absent
    size = [i for i in by_image["b.png"] if i.question_type == "SIZE"]
    assert len(size) == 1 and size[0].answer == ("no" if "normal" in size[0].question else "yes")
