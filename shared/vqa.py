"""Closed-ended visual question answering through the checkpoint's own prompt scoring.

A closed question is mapped onto diseases of the checkpoint's :class:`~shared.prompts.PromptBank` and answered from
their logits, ``P(present) = sigmoid(logit / T)`` (temperature ``T`` = 1 unless fitted on other data):

- presence: "Is there {d}?", "Is {d} present?", "Any {d}?", "Does the image show {d}?" → yes with P(present);
- normality: a short table of anatomical questions that name one disease honestly ("Is the heart size normal?" →
  *not* Cardiomegaly, "Is the heart enlarged?" → Cardiomegaly, "Is there any abnormality?" → *not* No Finding);
  inverted questions answer yes with 1 − P(present). "Are the lungs clear?" is not mapped: it asks about every
  lung finding, not only those a checkpoint scores;
- choice: "Which of these findings are present: A, B, C?" → the options with P(present) ≥ 0.5, and each P.

Disease names are matched as :mod:`shared.data.names` compares them (case, ``_``, NIH's ``Effusion``). Question
files follow VQA-RAD's JSON (``image_name``, ``question``, ``answer``, ``answer_type`` CLOSED/OPEN,
``question_type``, ``qid``); accuracy is reported overall, per answer type and per question type (as PeFoMed
reports VQA-RAD), with the expected calibration error (ECE) of the answers' probabilities beside it.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.optimize import minimize_scalar

from shared.data.names import ALIASES, did_you_mean, disease_key
from shared.errors import RetuneError
from shared.prompts import disease_phrase

Form = Literal["presence", "normality", "choice"]

#: Presence questions the evaluation-set generator asks ({d}: the disease as it reads in a sentence).
PRESENCE_TEMPLATES: tuple[str, ...] = ("Is there {d}?", "Is {d} present?", "Any {d}?", "Does the image show {d}?")
#: Normality questions per disease the generator asks: (question, inverted, VQA-RAD question type).
NORMALITY_TEMPLATES: dict[str, tuple[tuple[str, bool, str], ...]] = {
    "Cardiomegaly": (("Is the heart size normal?", True, "SIZE"), ("Is the heart enlarged?", False, "SIZE")),
    "Enlarged Cardiomediastinum": (("Is the mediastinum widened?", False, "SIZE"),),
    "No Finding": (("Is this chest X-ray normal?", False, "ABN"), ("Is there any abnormality?", True, "ABN")),
}
CHOICE_TEMPLATE = "Which of these findings are present: {options}?"

_SUBJECT = r"(?:the |this )?(?:patient|image|picture|film|radiograph|(?:chest )?x-?ray|cxr|study|chest)"
_LEAD = r"(?:(?:an?|any|some) )?(?:(?:evidence|signs?) of )?"
_WHERE = rf"(?: (?:in|on) {_SUBJECT})?"
_SEEN = r"(?:present|seen|visible|noted|evident)"
_PRESENCE = tuple(re.compile(p) for p in (
    rf"(?:is|are) there {_LEAD}(?P<d>.+?)(?: {_SEEN})?{_WHERE}",
    rf"(?:is|are) {_LEAD}(?P<d>.+?) {_SEEN}{_WHERE}",
    rf"any {_LEAD}(?P<d>.+?){_WHERE}",
    rf"(?:does|do|did) {_SUBJECT} (?:have|show|demonstrate|display) {_LEAD}(?P<d>.+?)",
))
_HEART = r"(?:the )?(?:heart|cardiac silhouette|cardiac shadow|heart shadow)"
_HEART_SIZE = r"(?:the )?(?:heart|cardiac) size"
_NORMAL = r"(?:normal|within normal limits)(?: in size)?"
#: (pattern, disease, inverted, question type): questions about anatomy that name exactly one disease.
_NORMALITY: tuple[tuple[re.Pattern[str], str, bool, str], ...] = tuple((re.compile(p), d, inv, qtype) for p, d, inv, qtype in (
    (rf"(?:is|are) (?:{_HEART}|{_HEART_SIZE}) {_NORMAL}", "Cardiomegaly", True, "SIZE"),
    (rf"(?:is|are) (?:{_HEART}|{_HEART_SIZE}) (?:enlarged|large|big|increased|abnormal)", "Cardiomegaly", False, "SIZE"),
    (rf"(?:is|are) there (?:an? )?enlarged (?:heart|cardiac silhouette){_WHERE}", "Cardiomegaly", False, "SIZE"),
    (r"is (?:the )?mediastinum (?:widened|enlarged)", "Enlarged Cardiomediastinum", False, "SIZE"),
    (rf"is (?:the )?mediastinum {_NORMAL}", "Enlarged Cardiomediastinum", True, "SIZE"),
    (rf"(?:is|does) {_SUBJECT} (?:look )?normal", "No Finding", False, "ABN"),
    (rf"(?:is|are) there (?:any )?(?:abnormalit(?:y|ies)|abnormal findings?){_WHERE}", "No Finding", True, "ABN"),
))
_CHOICE = tuple(re.compile(p) for p in (
    (rf"which (?:one )?of (?:these|the following)(?: (?:findings|diseases|conditions|abnormalities|options))? "
     rf"(?:is|are) {_SEEN}{_WHERE} ?:? ?(?P<list>.+)"),
    rf"which (?:findings|diseases|conditions|abnormalities) (?:is|are) {_SEEN}{_WHERE} ?: ?(?P<list>.+)",
    rf"which of (?P<list>.+?) (?:is|are) {_SEEN}{_WHERE}",
))
#: Questions refused on purpose: no disease list a checkpoint scores answers them honestly.
_UNMAPPED = re.compile(r"(?:are|is) (?:the )?(?:lungs?|lung fields?) (?:clear|normal)")
_SPLIT = re.compile(r"\s*(?:,|;|/|\bor\b|\band\b)\s*")
_ARTICLE = re.compile(r"^(?:(?:an?|any|some|the) )?(?:(?:evidence|signs?) of )?")


@dataclass(frozen=True)
class Question:
    """A closed question mapped onto diseases; ``inverted``: "yes" means the disease is absent."""

    text: str
    form: Form
    diseases: tuple[str, ...]
    inverted: bool = False
    question_type: str = "PRES"


@dataclass(frozen=True)
class Answer:
    """``answer``: yes/no, or the present options comma-separated ("none"); ``probability``: P(yes) for a yes/no
    question (None for a choice); ``findings``: P(present) of every disease asked about."""

    question: Question
    answer: str
    probability: float | None
    findings: dict[str, float]


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower().replace("_", " ")).rstrip(" ?.!")


class Vocabulary:
    """The diseases a checkpoint scores, by every spelling :mod:`shared.data.names` accepts (and plurals)."""

    def __init__(self, diseases: tuple[str, ...]) -> None:
        self.diseases = diseases
        self._by_key: dict[str, str] = {}
        for disease in diseases:
            key = disease_key(disease)
            for spelling in (key, ALIASES.get(key)):
                if spelling is not None:
                    self._by_key.setdefault(spelling, disease)

    def known(self) -> str:
        return ", ".join(disease_phrase(d) for d in self.diseases)

    def find(self, phrase: str) -> str | None:
        """The disease ``phrase`` names (``a``/``any``/``evidence of`` dropped, plural allowed), or None."""
        key = _ARTICLE.sub("", disease_key(phrase)).strip()
        return self._by_key.get(key) or (self._by_key.get(key[:-1]) if key.endswith("s") else None)

    def require(self, phrase: str, question: str) -> str:
        """:meth:`find`, or an error naming the diseases this checkpoint scores."""
        disease = self.find(phrase)
        if disease is None:
            hint = did_you_mean(_ARTICLE.sub("", disease_key(phrase)), self.diseases)
            raise RetuneError(f"question {question!r} asks about {phrase.strip()!r}{hint}, which this checkpoint does "
                              f"not score; it scores: {self.known()}")
        return disease


def parse_question(text: str, diseases: tuple[str, ...]) -> Question:
    """Map a closed question onto ``diseases`` (the checkpoint's bank); a question it cannot map is an error."""
    vocab = Vocabulary(diseases)
    q = _normalise(text)
    if _UNMAPPED.fullmatch(q):
        raise RetuneError(f"question {text!r} asks about every lung finding, not only those this checkpoint scores: "
                          f"ask about each of {vocab.known()} instead")
    for pattern, disease, inverted, qtype in _NORMALITY:
        if pattern.fullmatch(q):
            if disease not in diseases:
                raise RetuneError(f"question {text!r} needs the {disease!r} label, which this checkpoint does not "
                                  f"score; it scores: {vocab.known()}")
            return Question(text, "normality", (disease,), inverted, qtype)
    for pattern in _CHOICE:
        match = pattern.fullmatch(q)
        if match:
            options = [o for o in _SPLIT.split(match["list"]) if o]
            chosen = tuple(dict.fromkeys(vocab.require(o, text) for o in options))
            return Question(text, "choice", chosen)
    slot = None
    for pattern in _PRESENCE:
        match = pattern.fullmatch(q)
        if match:
            disease = vocab.find(match["d"])
            if disease is not None:
                return Question(text, "presence", (disease,))
            slot = slot or match["d"]
    if slot is not None:
        vocab.require(slot, text)  # raises, naming the closest disease
    raise RetuneError(f"cannot answer {text!r}: ask 'Is there {{finding}}?', 'Is the heart size normal?' or 'Which "
                      f"of these findings are present: A, B?' about diseases this checkpoint scores: {vocab.known()}")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def answer_question(question: Question, logits: np.ndarray, diseases: tuple[str, ...],
                    temperature: float = 1.0) -> Answer:
    """Answer from one image's logits [C] (in ``diseases`` order), probabilities ``sigmoid(logit / temperature)``."""
    findings = {d: _sigmoid(float(logits[diseases.index(d)]) / temperature) for d in question.diseases}
    if question.form == "choice":
        present = [d for d, p in findings.items() if p >= 0.5]
        return Answer(question, ", ".join(present) or "none", None, findings)
    p = findings[question.diseases[0]]
    p_yes = 1.0 - p if question.inverted else p
    return Answer(question, "yes" if p_yes >= 0.5 else "no", p_yes, findings)


def decisions(question: Question, logits: np.ndarray, diseases: tuple[str, ...],
              truth: bool | frozenset[str]) -> list[tuple[float, bool]]:
    """The yes/no decisions a question makes, as (logit of yes, true answer is yes): one for a yes/no question, one
    per option (present or not) for a choice."""
    logit = {d: float(logits[diseases.index(d)]) for d in question.diseases}
    if isinstance(truth, bool):
        d = question.diseases[0]
        return [(-logit[d] if question.inverted else logit[d], truth)]
    return [(logit[d], d in truth) for d in question.diseases]


def expected_calibration_error(pairs: list[tuple[float, bool]], temperature: float = 1.0, bins: int = 10) -> float | None:
    """ECE of yes/no decisions (Guo et al. 2017): the confidence of each answer given (max(P, 1 − P)) against
    whether it was right, in ``bins`` equal-width bins, weighted by their share of the decisions."""
    if not pairs:
        return None
    p = np.array([_sigmoid(z / temperature) for z, _ in pairs])
    confidence = np.maximum(p, 1.0 - p)
    correct = (p >= 0.5) == np.array([y for _, y in pairs])
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return float(sum(abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).sum()
                     for b in range(bins) if (which == b).any()) / len(pairs))


def fit_temperature(pairs: list[tuple[float, bool]]) -> float:
    """The temperature T (0.05 to 20) that minimises the decisions' binary log-loss under sigmoid(logit / T).
    Fit it on questions other than those reported on: it changes no answer (the sign of the logit), only P."""
    if not pairs:
        raise RetuneError("no answerable closed questions to fit a temperature on")
    z = np.array([z for z, _ in pairs])
    y = np.array([y for _, y in pairs], dtype=float)

    def loss(log_t: float) -> float:
        s = z / math.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    return float(math.exp(minimize_scalar(loss, bounds=(math.log(0.05), math.log(20.0)), method="bounded").x))


@dataclass(frozen=True)
class VqaItem:
    """One question as VQA-RAD's JSON writes it (its other keys are ignored)."""

    image_name: str
    question: str
    answer: str
    answer_type: str
    question_type: str = ""
    qid: int | str | None = None


def read_items(path: Path) -> list[VqaItem]:
    """Read a VQA-RAD-style JSON list; a missing file, non-list or item without a required key is an error."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RetuneError(f"questions file {path} not found: check the path") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RetuneError(f"{path} is not UTF-8 JSON ({exc}): expected a VQA-RAD-style list of questions") from None
    if not isinstance(data, list):
        raise RetuneError(f"{path} holds a JSON {type(data).__name__}: expected a list of question objects")
    items = []
    for i, entry in enumerate(data):
        missing = [k for k in ("image_name", "question", "answer", "answer_type") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise RetuneError(f"{path}: question {i} lacks {', '.join(missing)} (VQA-RAD keys: image_name, question, "
                              "answer, answer_type, question_type, qid)")
        items.append(VqaItem(str(entry["image_name"]), str(entry["question"]), str(entry["answer"]).strip(),
                             str(entry["answer_type"]).strip().upper(), str(entry.get("question_type") or "").strip(),
                             entry.get("qid")))
    return items


def write_items(path: Path, items: list[VqaItem]) -> None:
    """Write ``items`` as a VQA-RAD-style JSON list."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps([asdict(i) for i in items], indent=1) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class Outcome:
    """One question evaluated: ``answer`` and ``correct``, or the reason it was ``skipped``; ``pairs``: its
    decisions for the ECE (see :func:`decisions`)."""

    item: VqaItem
    answer: Answer | None = None
    correct: bool | None = None
    skipped: str | None = None
    pairs: tuple[tuple[float, bool], ...] = ()


def _truth(question: Question, answer: str, vocab: Vocabulary) -> bool | frozenset[str] | None:
    """The true answer as a bool (yes/no) or a set of diseases (choice); None when it cannot be read."""
    text = _normalise(answer)
    if question.form != "choice":
        return {"yes": True, "no": False}.get(text)
    if text in ("none", "no", "neither"):
        return frozenset()
    found = [vocab.find(o) for o in _SPLIT.split(text) if o]
    return None if None in found else frozenset(d for d in found if d is not None)


def evaluate_item(item: VqaItem, logits: np.ndarray | None, diseases: tuple[str, ...],
                  temperature: float = 1.0) -> Outcome:
    """Answer one question from its image's logits (None: unreadable) and compare with the true answer."""
    if item.answer_type != "CLOSED":
        return Outcome(item, skipped=f"{item.answer_type or 'no'} answer type (only CLOSED questions are answered)")
    try:
        question = parse_question(item.question, diseases)
    except RetuneError:
        return Outcome(item, skipped="question not about a finding this checkpoint scores")
    truth = _truth(question, item.answer, Vocabulary(diseases))
    if truth is None:
        return Outcome(item, skipped="answer is not yes/no" if question.form != "choice"
                       else "answer names a finding this checkpoint does not score")
    if logits is None:
        return Outcome(item, skipped="image missing or unreadable")
    answer = answer_question(question, logits, diseases, temperature)
    given = answer.answer == "yes" if isinstance(truth, bool) else frozenset(d for d, p in answer.findings.items()
                                                                              if p >= 0.5)
    return Outcome(item, answer, given == truth, None, tuple(decisions(question, logits, diseases, truth)))


def _group(outcomes: list[Outcome]) -> dict:
    answered = [o for o in outcomes if o.skipped is None]
    correct = sum(bool(o.correct) for o in answered)
    return {"questions": len(outcomes), "answered": len(answered), "correct": correct,
            "accuracy": correct / len(answered) if answered else None}


def summarise(outcomes: list[Outcome], temperature: float = 1.0) -> dict:
    """Accuracy (over answered questions) overall, per answer type, per question type and per form; skipped
    questions by reason; ECE of every decision at ``temperature`` (and at 1 when it differs)."""
    pairs = [p for o in outcomes for p in o.pairs]

    def by(key: Callable[[Outcome], str]) -> dict[str, dict]:
        return {k: _group([o for o in outcomes if key(o) == k]) for k in sorted({key(o) for o in outcomes})}

    summary = {**_group(outcomes),
               "skipped": dict(Counter(o.skipped for o in outcomes if o.skipped is not None).most_common()),
               "ece": expected_calibration_error(pairs, temperature), "decisions": len(pairs),
               "temperature": temperature,
               "per_answer_type": by(lambda o: o.item.answer_type or "(none)"),
               "per_question_type": by(lambda o: o.item.question_type or "(none)"),
               "per_form": {k: v for k, v in by(lambda o: o.answer.question.form if o.answer else "skipped").items()
                            if k != "skipped"}}
    if temperature != 1.0:
        summary["ece_uncalibrated"] = expected_calibration_error(pairs)
    return summary
