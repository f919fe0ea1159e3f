"""A closed-question VQA evaluation set drawn from a labelled manifest (the phantoms' ``manifest.csv``, or any label
file the readers take): never runs at a hospital.

Per image, every disease labelled 1 or 0 gets a presence question (a template drawn at random), a labelled disease
with a normality question gets one too (Cardiomegaly: "Is the heart size normal?" or "Is the heart enlarged?"), and
an image with two or more labelled diseases gets one "Which of these findings are present: …?" over two to four of
them. Uncertain (-1) and blank labels produce no question. Written as VQA-RAD-style JSON (:mod:`shared.vqa`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from shared.data.readers import read_labels
from shared.errors import RetuneError
from shared.prompts import disease_phrase
from shared.vqa import CHOICE_TEMPLATE, NORMALITY_TEMPLATES, PRESENCE_TEMPLATES, VqaItem


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def image_questions(image_name: str, labels: dict[str, float], rng: np.random.Generator) -> list[VqaItem]:
    """The questions of one image from its labels (1.0, 0.0, or NaN for not labelled), without ``qid``."""
    known = {d: bool(y) for d, y in labels.items() if not np.isnan(y)}
    items = [VqaItem(image_name, str(rng.choice(PRESENCE_TEMPLATES)).format(d=disease_phrase(d)), _yes_no(y),
                     "CLOSED", "PRES") for d, y in known.items()]
    for disease, templates in NORMALITY_TEMPLATES.items():
        if disease in known:
            text, inverted, qtype = templates[int(rng.integers(len(templates)))]
            items.append(VqaItem(image_name, text, _yes_no(known[disease] != inverted), "CLOSED", qtype))
    if len(known) >= 2:
        k = int(rng.integers(2, min(4, len(known)) + 1))
        options = [str(d) for d in rng.choice(list(known), size=k, replace=False)]
        question = CHOICE_TEMPLATE.format(options=", ".join(disease_phrase(d) for d in options))
        answer = ", ".join(d for d in options if known[d]) or "none"
        items.append(VqaItem(image_name, question, answer, "CLOSED", "PRES"))
    return items


def make_questions(data: Path, seed: int = 0, split: str = "all", fmt: str = "auto",
                   image_root: Path | None = None) -> tuple[list[VqaItem], Path]:
    """Questions for every image of ``data`` (of ``split``: train|val|test|all) and the folder their
    ``image_name`` is relative to (``image_root``, by default the label file's folder)."""
    if split not in ("all", "train", "val", "test"):
        raise RetuneError(f"unknown split {split!r}: use train, val, test or all")
    table = read_labels(data, format=fmt, uncertain="ignore", image_root=image_root)
    root = Path(image_root or Path(data).expanduser().resolve().parent).resolve()
    frame = table.frame if split == "all" else table.frame[table.frame["split"] == split]
    rng = np.random.default_rng(seed)
    items: list[VqaItem] = []
    for _, row in frame.iterrows():
        name = os.path.relpath(str(row["image"]), root)
        items.extend(image_questions(name, {d: float(row[d]) for d in table.diseases}, rng))
    if not items:
        raise RetuneError(f"{data} gives no questions ({split} split): every label there is uncertain or blank")
    return [VqaItem(i.image_name, i.question, i.answer, i.answer_type, i.question_type, qid)
            for qid, i in enumerate(items)], root
