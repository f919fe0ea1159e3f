"""The phantom sentence bank and the phantom ground-truth reports (never run at a hospital).

Both come from the report generator the offline default backbone was pretrained with
(:mod:`research.pretrain.reports`), so the bank speaks the phrasing that backbone's text tower was trained on, and its
tags are exact: each sentence is drawn for a known finding and polarity.

A ground-truth report of a phantom case has a FINDINGS section (the generator's report for the case, from its
report-derived labels, without section headers) and an IMPRESSION section (each present finding restated with its
details, or a normal-study line when none is present).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from research.phantom import PhantomCase
from research.phantom.findings import Findings
from research.pretrain.reports import (DESCRIBED_ABSENT, NEGATIVE, NORMAL, NOUN, POSITIVE, ReportConfig,
                                       finding_sentence, write_report)
from shared.labels import CHEXPERT5
from shared.reports import Polarity, Section, SentenceBank, build_bank

PHANTOM_SOURCE: dict[str, str] = {
    "name": "phantom",
    "title": "sentences of the phantom report generator (research.pretrain.reports) that pretrained "
             "retune-minilm-phantom",
    "licence": "this project's own text (Apache-2.0)",
}
HEADERS = frozenset({"Findings:", "Impression:", "FINDINGS:"})


def phantom_bank(seed: int = 0, per_disease: int = 60) -> SentenceBank:
    """Every negative phrasing and merged negation of the generator, ``per_disease`` draws of positive phrasings per
    finding (details drawn at random), and its normal-study lines; tags exact by construction."""
    rng = np.random.default_rng((seed, 0xD4AF))
    config = ReportConfig()
    sections: list[tuple[Section, str]] = []
    tags: dict[str, dict[str, Polarity]] = {}

    def add(text: str, known: dict[str, Polarity], where: tuple[Section, ...]) -> None:
        tags[text] = known
        sections.extend((section, text) for section in where)

    for d, disease in enumerate(CHEXPERT5):
        for r in rng.integers(2**62, size=per_disease):
            stream = np.random.default_rng(int(r))
            add(finding_sentence(d, True, Findings(), stream, config), {disease: "positive"}, ("findings",))
            add(POSITIVE[d](Findings(), stream), {disease: "positive"}, ("findings", "impression"))
        for text in (*NEGATIVE[d], *DESCRIBED_ABSENT[d]):
            add(text, {disease: "negative"}, ("findings",))
    for size in range(2, len(CHEXPERT5) + 1):
        for group in combinations(range(len(CHEXPERT5)), size):
            nouns = [NOUN[d][0] for d in group]
            add(f"No {', '.join(nouns[:-1])} or {nouns[-1]}.", {CHEXPERT5[d]: "negative" for d in group},
                ("findings",))
    for text in NORMAL:
        add(text, {}, ("findings", "impression"))
    return build_bank(sections, PHANTOM_SOURCE, tags)


def phantom_truth(case: PhantomCase, rng: np.random.Generator) -> dict[str, str]:
    """The ground-truth ``{"findings": ..., "impression": ...}`` report of ``case``, drawn with ``rng``."""
    report = write_report(case, rng)
    findings = " ".join(s for s in report.sentences if s not in HEADERS)
    present = [d for d, y in enumerate(case.observed) if y > 0.5]
    impression = (" ".join(POSITIVE[d](case.findings, rng) for d in present) if present
                  else str(rng.choice(NORMAL)))
    return {"findings": findings, "impression": impression}
