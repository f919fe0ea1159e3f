"""``retune ask`` (one closed question about one image) and ``retune vqa make|evaluate`` (a question set)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.config import default_cache_dir
from shared.errors import RetuneError

console = Console(stderr=True)
vqa_app = typer.Typer(help="Closed-question VQA sets: make one from labels, evaluate a checkpoint on one.",
                      no_args_is_help=True)

CheckpointOpt = Annotated[Path, typer.Option(help="Folder holding adaptors.safetensors and adaptors.json.")]
CacheOpt = Annotated[Path, typer.Option(help="Embedding cache folder (stays on this machine).")]
PublicKeyOpt = Annotated[Optional[Path], typer.Option(help="consortium.pub: refuse a checkpoint it did not sign.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
TemperatureOpt = Annotated[float, typer.Option(min=0.01, help="Probabilities are sigmoid(logit / T); T fitted by "
                                                                "`retune vqa evaluate --calibrate-on`.")]


def ask(
    image: Annotated[Path, typer.Argument(help="PNG/JPEG/DICOM file.")],
    question: Annotated[str, typer.Argument(help="A closed question: 'Is there edema?', 'Is the heart size normal?', "
                                                 "'Which of these findings are present: A, B?'.")],
    checkpoint: CheckpointOpt, cache: CacheOpt = default_cache_dir(), public_key: PublicKeyOpt = None,
    as_json: JsonOpt = False, temperature: TemperatureOpt = 1.0,
) -> None:
    """Answer a closed question about one image with the checkpoint's probability."""
    from deploy.inference import score_images
    from shared.vqa import answer_question, parse_question

    scored = score_images(checkpoint, [image], cache, public_key, console)
    if not scored.ok[0]:
        raise RetuneError(f"image {image} could not be read: give a readable PNG, JPEG or DICOM file")
    diseases = scored.bank.diseases
    answer = answer_question(parse_question(question, diseases), scored.logits[0], diseases, temperature)
    q = answer.question
    result = {"image": str(image), "question": question, "answer": answer.answer, "probability": answer.probability,
              "findings": answer.findings, "mapped": {"form": q.form, "diseases": list(q.diseases),
                                                     "inverted": q.inverted, "question_type": q.question_type}}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    asked = ", ".join(f"{d} {p:.2f}" for d, p in answer.findings.items())
    how = f"P(yes) = {answer.probability:.2f}; " if answer.probability is not None else ""
    Console().print(f"[bold]{escape(answer.answer)}[/]  ({how}P(present): {escape(asked)})", soft_wrap=True)


@vqa_app.command("make")
def make(
    data: Annotated[Path, typer.Option("--data", help="Labelled manifest (retune phantom's manifest.csv or any "
                                                      "label file retune reads).")],
    out: Annotated[Path, typer.Option("--out", help="VQA-RAD-style JSON to write.")],
    seed: Annotated[int, typer.Option(help="Seed of the question templates and choice options.")] = 0,
    split: Annotated[str, typer.Option(help="Images of this split only: train|val|test|all.")] = "all",
    fmt: Annotated[str, typer.Option("--format", help="auto|chexpert|nih|mimic|manifest")] = "auto",
) -> None:
    """Write closed questions (presence, heart size, which-of) with their answers from the labels."""
    from research.vqa import make_questions
    from shared.vqa import write_items

    items, root = make_questions(data, seed, split, fmt)
    write_items(out, items)
    console.print(f"wrote {len(items)} questions to {out}; image names are relative to {root} "
                  f"(retune vqa evaluate --images {root})", soft_wrap=True)


def _image_logits(checkpoint: Path, names: list[str], images: Path, cache: Path, public_key: Path | None):
    """The checkpoint's diseases and each image's logits (None where unreadable), scored once per image."""
    from deploy.inference import score_images

    unique = list(dict.fromkeys(names))
    scored = score_images(checkpoint, [images / n for n in unique], cache, public_key, console)
    rows = {n: (scored.logits[i] if scored.ok[i] else None) for i, n in enumerate(unique)}
    return scored.bank.diseases, rows


def _table(summary: dict, title: str) -> Table:
    table = Table(title=title)
    for column in ("group", "questions", "answered", "correct", "accuracy"):
        table.add_column(column, justify="left" if column == "group" else "right")

    def row(name: str, g: dict) -> None:
        accuracy = "-" if g["accuracy"] is None else f"{g['accuracy']:.3f}"
        table.add_row(name, str(g["questions"]), str(g["answered"]), str(g["correct"]), accuracy)

    row("[bold]overall", summary)
    for key, label in (("per_answer_type", "answer type"), ("per_question_type", "question type"),
                       ("per_form", "form")):
        for name, group in summary[key].items():
            row(f"{label} {escape(name)}", group)
    return table


@vqa_app.command("evaluate")
def evaluate(
    checkpoint: CheckpointOpt,
    questions: Annotated[Path, typer.Option(help="VQA-RAD-style JSON (image_name, question, answer, answer_type, "
                                                 "question_type).")],
    images: Annotated[Optional[Path], typer.Option(help="Folder image_name is relative to (default: the "
                                                        "questions file's).")] = None,
    calibrate_on: Annotated[Optional[Path], typer.Option(help="Other questions (same --images) to fit the "
                                                              "temperature on; never the reported ones.")] = None,
    temperature: TemperatureOpt = 1.0, cache: CacheOpt = default_cache_dir(), public_key: PublicKeyOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Also write the summary and every answer as JSON here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy of a checkpoint's answers overall, per answer type and per question type, with the ECE."""
    from shared.vqa import evaluate_item, fit_temperature, read_items, summarise

    items = read_items(questions)
    fit = read_items(calibrate_on) if calibrate_on is not None else []
    if calibrate_on is not None and {i.image_name for i in fit} & {i.image_name for i in items}:
        raise RetuneError(f"{calibrate_on} asks about images that {questions} asks about too: fit the temperature "
                          "on other images")
    root = images or questions.resolve().parent
    diseases, rows = _image_logits(checkpoint, [i.image_name for i in items + fit], root, cache, public_key)
    if fit:
        temperature = fit_temperature([p for i in fit for p in evaluate_item(i, rows[i.image_name], diseases).pairs])
    outcomes = [evaluate_item(i, rows[i.image_name], diseases, temperature) for i in items]
    summary = {"checkpoint": str(checkpoint), "questions_file": str(questions), **summarise(outcomes, temperature)}
    if calibrate_on is not None:
        summary["temperature_fitted_on"] = str(calibrate_on)
    if out is not None:
        answers = [{"qid": o.item.qid, "image_name": o.item.image_name, "question": o.item.question,
                    "answer": o.item.answer, "predicted": o.answer.answer if o.answer else None,
                    "probability": o.answer.probability if o.answer else None, "correct": o.correct,
                    "skipped": o.skipped} for o in outcomes]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**summary, "answers": answers}, indent=1) + "\n")
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    Console().print(_table(summary, f"{questions} ({len(items)} questions)"))
    skipped = ", ".join(f"{n} {reason}" for reason, n in summary["skipped"].items()) or "none"
    ece = "-" if summary["ece"] is None else f"{summary['ece']:.3f}"
    Console().print(f"ECE {ece} over {summary['decisions']} yes/no decisions (T = {temperature:.3g}); "
                    f"skipped: {escape(skipped)}", soft_wrap=True)
