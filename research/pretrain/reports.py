"""Report-style text for phantom chest X-rays: what the contrastive pretraining pairs each image with.

A report mentions findings in varied radiology phrasing, present ones with severity and side words taken from the
case's rendered findings ("Moderate left pleural effusion."), absent ones as negations ("No pleural effusion.",
"Heart size is normal."), sometimes several negations in one sentence, in random order, and leaves some findings
out, as real reports do. Polarity follows the case's report-derived (noisy) labels ``observed``, as a radiologist's
report is where such labels come from.

Every report also has a *hard negative*: the same report with one mentioned finding's polarity flipped (the rest
phrased identically), which forces the image tower to tell "effusion" from "no effusion" rather than to match a
report by its topic words.

The RE-tune prompt sentences (:mod:`shared.prompts`) never appear: no phrasing here uses their frames ("findings
consistent with", "findings suggesting", "can represent", "most compatible with", "there is no", "no evidence of",
"no signs of"), so a zero-shot score measures how the text tower generalises across phrasing, not memory.
:func:`leaks_prompt` checks a text for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.labels import CHEXPERT5
from research.phantom import PhantomCase
from research.phantom.findings import RIGHT, Findings, Patch

ATELECTASIS, CARDIOMEGALY, CONSOLIDATION, EDEMA, EFFUSION = range(5)
#: Frames of the RE-tune prompt templates, lower case, kept out of every training text.
PROMPT_FRAMES: tuple[str, ...] = ("findings consistent with", "findings suggesting", "can represent",
                                  "most compatible with", "there is no", "no evidence of", "no signs of",
                                  "consistent with", "suggesting", "compatible with")

# --- absent findings ---------------------------------------------------------------------------------------------
NEGATIVE: dict[int, tuple[str, ...]] = {
    ATELECTASIS: ("No atelectasis.", "Atelectasis is absent.", "Negative for atelectasis.", "No lobar collapse.",
                  "Lungs are well expanded without atelectasis.", "No volume loss or atelectasis.",
                  "Without atelectasis.", "No focal atelectasis is seen.", "Atelectasis has resolved.",
                  "No atelectasis is identified.", "Atelectasis is not seen."),
    CARDIOMEGALY: ("Heart size is normal.", "Normal heart size.", "No cardiomegaly.", "The heart is not enlarged.",
                   "Cardiac silhouette is within normal limits.", "Cardiomediastinal silhouette is unremarkable.",
                   "Cardiomegaly is absent.", "Negative for cardiomegaly.", "The cardiac size is normal.",
                   "Normal size of the cardiac silhouette.", "Cardiomegaly is not seen."),
    CONSOLIDATION: ("No focal consolidation.", "No consolidation.", "No airspace consolidation.",
                    "Consolidation is absent.", "Negative for consolidation.", "Lungs are clear without consolidation.",
                    "No focal airspace opacity.", "Without focal consolidation.", "No consolidation is seen.",
                    "No consolidation is identified.", "Consolidation is not seen."),
    EDEMA: ("No pulmonary edema.", "No edema.", "No vascular congestion or pulmonary edema.", "Edema is absent.",
            "Negative for pulmonary edema.", "Pulmonary vasculature is normal.", "No interstitial edema.",
            "Without pulmonary edema.", "No pulmonary edema is seen.", "No edema is identified.",
            "Pulmonary edema is not seen."),
    EFFUSION: ("No pleural effusion.", "No pleural effusions.", "No effusion.", "Costophrenic angles are sharp.",
               "Pleural effusion is absent.", "Negative for pleural effusion.", "No pleural fluid.",
               "Without pleural effusion.", "No pleural effusion is seen.", "No pleural effusion is identified.",
               "Pleural effusion is not seen."),
}
#: Short nouns for merged negations ("No pleural effusion, focal consolidation or pulmonary edema.").
NOUN: dict[int, tuple[str, ...]] = {
    ATELECTASIS: ("atelectasis",), CARDIOMEGALY: ("cardiomegaly",),
    CONSOLIDATION: ("focal consolidation", "consolidation"), EDEMA: ("pulmonary edema", "edema"),
    EFFUSION: ("pleural effusion", "effusion"),
}
NORMAL = ("No acute cardiopulmonary abnormality.", "Normal chest radiograph.", "No acute cardiopulmonary process.",
          "Unremarkable chest.", "No acute findings.")
FILLER = ("No pneumothorax.", "Osseous structures are intact.", "Degenerative changes of the thoracic spine.",
          "Mediastinal contours are normal.", "Trachea is midline.", "Visualized bones are unremarkable.",
          "No pneumothorax is identified.", "Comparison is made with no prior study.")


def _severity_word(s: float, rng: np.random.Generator, kind: str = "size") -> str:
    """A severity adjective for ``s`` in [0, 1] (0.2 ~ mild, 0.5 ~ moderate), sometimes hedged or left out."""
    if kind == "size":
        bands = (("trace", "tiny", "small", "minimal"), ("small", "small to moderate", "moderate"),
                 ("moderate", "moderate to large"), ("large", "extensive", "massive"))
    else:
        bands = (("minimal", "subtle", "mild"), ("mild", "mild to moderate"), ("moderate", "moderate to severe"),
                 ("severe", "marked", "extensive"))
    band = 0 if s < 0.15 else 1 if s < 0.4 else 2 if s < 0.65 else 3
    return str(rng.choice(bands[band]))


def _side_word(side: int) -> str:
    return "right" if side == RIGHT else "left"


def _zone(v: float) -> str:
    return "upper" if v < -0.3 else "mid" if v < 0.05 else "lower"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# --- present findings --------------------------------------------------------------------------------------------
def _cardiomegaly(f: Findings, rng: np.random.Generator) -> str:
    s = (f.ctr - 0.49) / 0.16 if f.ctr is not None else float(rng.uniform(0.0, 1.0))
    word = _severity_word(s, rng, "degree")
    adverb = {"minimal": "minimally", "subtle": "mildly", "mild": "mildly", "mild to moderate": "mildly",
              "moderate": "moderately", "moderate to severe": "moderately", "severe": "severely",
              "marked": "markedly", "extensive": "markedly"}[word]
    return str(rng.choice((
        f"{_cap(word)} cardiomegaly.", "Cardiomegaly.", f"The heart is {adverb} enlarged.",
        f"{_cap(word)} enlargement of the cardiac silhouette.", "Enlarged cardiac silhouette.",
        "Cardiomegaly is present.", f"Heart size is {adverb} enlarged.", "Stable cardiomegaly.",
        f"The cardiac silhouette is {adverb} enlarged.")))


def _effusion(f: Findings, rng: np.random.Generator) -> str:
    if f.effusions:
        volume = max(e.volume for e in f.effusions)
        s = (volume - 0.04) / 0.9
        if len(f.effusions) == 2:
            bigger = _side_word(max(f.effusions, key=lambda e: e.volume).side)
            where = str(rng.choice(("bilateral", "bilateral", f"bilateral, {bigger} greater than", "both")))
        else:
            where = _side_word(f.effusions[0].side)
    else:
        s, where = float(rng.uniform(0.0, 1.0)), str(rng.choice(("right", "left", "bilateral")))
    size = _severity_word(s, rng, "size")
    if where.startswith("bilateral,"):
        side = where.split(", ")[1].split()[0]
        return str(rng.choice((f"Bilateral pleural effusions, {side} greater than {'left' if side == 'right' else 'right'}.",
                               f"{_cap(size)} bilateral pleural effusions, larger on the {side}.")))
    plural = "s" if where in ("bilateral", "both") else ""
    where = "bilateral" if where == "both" else where
    options = [f"{_cap(size)} {where} pleural effusion{plural}.", f"{_cap(where)} pleural effusion{plural}.",
               f"There is a {size} {where} pleural effusion{plural}." if not plural else
               f"There are {size} bilateral pleural effusions.",
               f"{_cap(size)} {where} effusion{plural}.", f"Pleural effusion{plural} on the {where}." if not plural
               else "Pleural effusions on both sides.", f"Layering {where} pleural effusion{plural}."]
    if s < 0.25 and not plural:
        options.append(f"Blunting of the {where} costophrenic angle from a {size} pleural effusion.")
    return str(rng.choice(options))


def _consolidation_site(f: Findings, rng: np.random.Generator) -> tuple[str, str, bool, Patch | None]:
    """(side, zone, whether both lungs are involved, the densest patch) of the case's consolidation, or a random
    site and no patch without one."""
    if f.consolidations:
        p = max(f.consolidations, key=lambda q: q.density)
        return _side_word(p.side), _zone(p.centre[1]), len({q.side for q in f.consolidations}) > 1, p
    return str(rng.choice(("right", "left"))), str(rng.choice(("upper", "mid", "lower"))), False, None


def _lung_region(side: str, zone: str) -> str:
    return f"{side} {'base' if zone == 'lower' else zone + ' lung'}"


def _consolidation(f: Findings, rng: np.random.Generator) -> str:
    side, zone, multi, p = _consolidation_site(f, rng)
    s, air = ((p.density - 0.3) / 0.65, p.bronchograms) if p is not None else (float(rng.uniform(0.0, 1.0)), False)
    lobe = {"upper": "upper lobe", "mid": "middle lobe" if side == "right" else "lingula", "lower": "lower lobe"}[zone]
    dense = str(rng.choice(("patchy", "dense", "focal"))) if s > 0.4 else str(rng.choice(("patchy", "subtle", "focal")))
    where = str(rng.choice((f"{side} {lobe}", f"{side} {zone} zone", _lung_region(side, zone))))
    bronch = str(rng.choice((" with air bronchograms", ""))) if air else ""
    if multi:
        return str(rng.choice(("Multifocal consolidation in both lungs.", "Bilateral patchy consolidation.",
                               f"{_cap(dense)} consolidation in both lungs{bronch}.")))
    return str(rng.choice((
        f"{_cap(dense)} consolidation in the {where}{bronch}.", f"{_cap(where)} consolidation{bronch}.",
        f"Airspace consolidation in the {where}{bronch}.", f"There is {dense} consolidation in the {where}.",
        f"{_cap(dense)} {where} airspace consolidation.", f"Consolidation at the {where}{bronch}.")))


def _edema(f: Findings, rng: np.random.Generator) -> str:
    s = f.edema.severity if f.edema is not None else float(rng.uniform(0.0, 1.0))
    kerley = f.edema is not None and f.edema.kerley > 0.3
    word = _severity_word(s, rng, "degree")
    lines = str(rng.choice((" with Kerley B lines", " with septal lines", ""))) if kerley else ""
    return str(rng.choice((
        f"{_cap(word)} pulmonary edema{lines}.", "Pulmonary edema.", f"{_cap(word)} interstitial edema{lines}.",
        f"Vascular congestion and {word} pulmonary edema.", "Edema is present.",
        f"{_cap(word)} perihilar edema{lines}.", f"There is {word} pulmonary edema.",
        f"Findings of {word} pulmonary edema{lines}.")))


def _atelectasis(f: Findings, rng: np.random.Generator) -> str:
    a = f.atelectasis
    side = _side_word(a.side) if a is not None else str(rng.choice(("right", "left")))
    collapse = a.collapse if a is not None else ""
    s = (a.density - 0.2) / 0.45 if a is not None else float(rng.uniform(0.0, 1.0))
    if collapse:
        return str(rng.choice((f"{_cap(side)} {collapse} lobe collapse.",
                               f"Atelectasis of the {side} {collapse} lobe.",
                               f"{_cap(side)} {collapse} lobe atelectasis with volume loss.")))
    kind = str(rng.choice(("plate-like", "subsegmental", "linear", "discoid", "bibasilar" if s < 0.3 else "basilar")))
    word = _severity_word(s, rng, "degree")
    return str(rng.choice((
        f"{_cap(kind)} atelectasis at the {side} base.", f"{_cap(side)} basilar atelectasis.",
        f"{_cap(word)} {side} lower zone atelectasis.", f"{_cap(kind)} atelectasis in the {side} lung.",
        "Atelectasis is present.", f"{_cap(word)} atelectasis at the {side} base.",
        f"There is {kind} atelectasis on the {side}.", f"{_cap(side)} {kind} atelectasis.")))


_DETAILED = {ATELECTASIS: _atelectasis, CARDIOMEGALY: _cardiomegaly, CONSOLIDATION: _consolidation,
             EDEMA: _edema, EFFUSION: _effusion}
def _described_atelectasis(f: Findings, rng: np.random.Generator) -> str:
    a = f.atelectasis
    side = _side_word(a.side) if a is not None else str(rng.choice(("right", "left")))
    if a is not None and a.collapse:
        return str(rng.choice((f"Collapse of the {side} {a.collapse} lobe.",
                               f"{_cap(side)} {a.collapse} lobe volume loss.")))
    return str(rng.choice((f"{_cap(side)} basilar volume loss.", f"Plate-like opacity at the {side} lung base.",
                           f"Linear opacity at the {side} base with volume loss.",
                           f"Volume loss in the {side} lower lobe.", f"Subsegmental collapse at the {side} base.")))


def _described_cardiomegaly(f: Findings, rng: np.random.Generator) -> str:
    return str(rng.choice(("The heart is enlarged.", "Enlarged cardiac silhouette.", "Increased cardiothoracic ratio.",
                           "Heart size is increased.", "The cardiac silhouette is enlarged.", "Enlarged heart.")))


def _described_consolidation(f: Findings, rng: np.random.Generator) -> str:
    side, zone, multi, _ = _consolidation_site(f, rng)
    if multi:
        return str(rng.choice(("Bilateral airspace opacities.", "Multifocal airspace disease.")))
    where = _lung_region(side, zone)
    return str(rng.choice((f"Airspace opacity in the {where}.", f"Dense opacity in the {where}.",
                           f"Infiltrate in the {where}.", f"Airspace disease in the {where}.",
                           f"Focal opacification of the {where}.")))


def _described_edema(f: Findings, rng: np.random.Generator) -> str:
    kerley = f.edema is not None and f.edema.kerley > 0.3
    lines = " with Kerley B lines" if kerley and rng.random() < 0.5 else ""
    return str(rng.choice(("Pulmonary vascular congestion.", f"Interstitial markings are increased{lines}.",
                           f"Perihilar haziness{lines}.", "Cephalization of the pulmonary vessels.",
                           f"Fluid overload with interstitial thickening{lines}.")))


def _described_effusion(f: Findings, rng: np.random.Generator) -> str:
    if f.effusions:
        where = "both" if len(f.effusions) == 2 else _side_word(f.effusions[0].side)
    else:
        where = str(rng.choice(("right", "left", "both")))
    angle = "both costophrenic angles" if where == "both" else f"the {where} costophrenic angle"
    base = "both bases" if where == "both" else f"the {where} base"
    return str(rng.choice((f"Blunting of {angle}.", f"Layering pleural fluid at {base}.",
                           f"Meniscus of fluid at {base}.", f"Fluid in the pleural space at {base}.")))


#: A present finding described by what it looks like, without its label's name ("Blunting of the left
#: costophrenic angle."), as reports often do.
DESCRIBED = {ATELECTASIS: _described_atelectasis, CARDIOMEGALY: _described_cardiomegaly,
             CONSOLIDATION: _described_consolidation, EDEMA: _described_edema, EFFUSION: _described_effusion}
#: An absent finding stated without its label's name.
DESCRIBED_ABSENT: dict[int, tuple[str, ...]] = {
    ATELECTASIS: ("Lungs are well expanded.", "No volume loss.", "Lung volumes are normal."),
    CARDIOMEGALY: ("Heart size is normal.", "Normal cardiac silhouette.", "The heart is not enlarged."),
    CONSOLIDATION: ("Lungs are clear.", "No focal airspace opacity.", "No infiltrate."),
    EDEMA: ("Pulmonary vasculature is normal.", "No vascular congestion.", "No interstitial thickening."),
    EFFUSION: ("Costophrenic angles are sharp.", "No pleural fluid.", "No blunting of the costophrenic angles."),
}
#: Plain mentions without details ("Pleural effusion is present.", "Likely consolidation.").
GENERIC: dict[int, tuple[str, ...]] = {
    ATELECTASIS: ("atelectasis",), CARDIOMEGALY: ("cardiomegaly",), CONSOLIDATION: ("consolidation",),
    EDEMA: ("pulmonary edema", "edema"), EFFUSION: ("pleural effusion", "effusion"),
}
GENERIC_TEMPLATES = ("{D}.", "{D} is present.", "Likely {d}.", "Probable {d}.", "{D} is noted.", "{D} is seen.")


def generic_mention(disease: int, rng: np.random.Generator) -> str:
    d = str(rng.choice(GENERIC[disease]))
    return str(rng.choice(GENERIC_TEMPLATES)).format(d=d, D=_cap(d))


#: A sentence stating a present finding by name, with details drawn from the case's findings (or at random).
POSITIVE = _DETAILED


def finding_sentence(disease: int, present: bool, findings: Findings, stream: np.random.Generator,
                     config: "ReportConfig") -> str:
    """The sentence a report states ``disease`` with: described without its name (share ``config.described``),
    plainly named (share ``config.generic`` of the rest, present findings only) or named with details."""
    u = stream.random()
    if u < config.described:
        return DESCRIBED[disease](findings, stream) if present else str(stream.choice(DESCRIBED_ABSENT[disease]))
    if not present:
        return str(stream.choice(NEGATIVE[disease]))
    if stream.random() < config.generic:
        return generic_mention(disease, stream)
    return POSITIVE[disease](findings, stream)


@dataclass(frozen=True)
class ReportConfig:
    """How reports are sampled.

    Parameters
    ----------
    omit_absent : float
        Chance that an absent finding goes unmentioned (default 0.3).
    omit_present : float
        Chance that a present finding goes unmentioned (default 0.04).
    merge_negatives : float
        Chance that the absent findings mentioned are negated together in one sentence (default 0.3).
    filler : float
        Chance of each of up to two sentences about things outside the five findings (default 0.25).
    described : float
        Chance that a finding is described by its appearance without its label's name ("Blunting of the left
        costophrenic angle.", "Lungs are well expanded.") (default 0.6).
    generic : float
        Chance that a present finding stated by name is stated plainly, without severity or side ("Consolidation
        is present.") (default 0.0).
    """

    omit_absent: float = 0.3
    omit_present: float = 0.04
    merge_negatives: float = 0.3
    filler: float = 0.25
    described: float = 0.6
    generic: float = 0.0


@dataclass(frozen=True)
class Report:
    """A report as its sentences (a header such as "Findings:" counts as one) and its hard negative."""

    sentences: tuple[str, ...]
    hard_sentences: tuple[str, ...]  # the same report with one mentioned finding flipped; () when none is mentioned
    mentioned: tuple[int, ...]  # disease indices the report mentions
    flipped: int  # the disease flipped in the hard negative (-1 when none)

    @property
    def text(self) -> str:
        return " ".join(self.sentences)

    @property
    def hard_negative(self) -> str:
        return " ".join(self.hard_sentences)


def _render(polarity: dict[int, bool], findings: Findings, streams: dict[int, int], layout_seed: int,
            ap: bool, config: ReportConfig) -> tuple[str, ...]:
    """Render a report for ``polarity`` (disease -> present).

    Each disease's phrasing has its own random stream and the layout (order, merging, extras) draws a fixed set
    of numbers, so flipping one disease changes that disease's sentence only.
    """
    layout = np.random.default_rng(layout_seed)
    u = layout.random(8)
    keys = layout.random(len(CHEXPERT5) + 3)  # sentence order: one key per disease, normal line, two fillers
    picks = layout.integers(1 << 30, size=4)
    keyed: list[tuple[float, str]] = []
    negatives = [d for d, present in polarity.items() if not present]
    positives = [d for d, present in polarity.items() if present]
    for d in positives:
        keyed.append((keys[d], finding_sentence(d, True, findings, np.random.default_rng(streams[d]), config)))
    if len(negatives) >= 2 and u[0] < config.merge_negatives:
        ordered = sorted(negatives, key=lambda d: keys[d])
        nouns = [str(np.random.default_rng(streams[d]).choice(NOUN[d])) for d in ordered]
        joiner = "or" if u[1] < 0.7 else "and no"
        keyed.append((keys[ordered[0]], f"No {', '.join(nouns[:-1])} {joiner} {nouns[-1]}."))
    else:
        keyed.extend((keys[d], finding_sentence(d, False, findings, np.random.default_rng(streams[d]), config))
                     for d in negatives)
    if not positives and u[2] < 0.35:
        keyed.append((keys[5], NORMAL[picks[0] % len(NORMAL)]))
    for k in range(2):
        if u[3 + k] < config.filler:
            keyed.append((keys[6 + k], FILLER[picks[1 + k] % len(FILLER)]))
    sentences = [sentence for _, sentence in sorted(keyed)]
    if u[5] < 0.2:
        sentences.insert(0, f"{'AP portable' if ap else ('PA', 'PA and lateral')[picks[3] % 2]} view.")
    if u[6] < 0.15:
        sentences.insert(0, ("Findings:", "Impression:", "FINDINGS:")[picks[3] % 3])
    return tuple(sentences)


def write_report(case: PhantomCase, rng: np.random.Generator, config: ReportConfig = ReportConfig()) -> Report:
    """One report (and its hard negative) for ``case``, drawn with ``rng``."""
    observed = [bool(x > 0.5) for x in case.observed]
    polarity: dict[int, bool] = {}
    for d, present in enumerate(observed):
        if rng.random() >= (config.omit_present if present else config.omit_absent):
            polarity[d] = present
    streams = {d: int(s) for d, s in enumerate(rng.integers(2**62, size=len(CHEXPERT5)))}
    layout_seed = int(rng.integers(2**62))
    sentences = _render(polarity, case.findings, streams, layout_seed, case.anatomy.ap, config)
    if not polarity:
        return Report(sentences, (), (), -1)
    flipped = int(rng.choice(sorted(polarity)))
    flipped_polarity = {**polarity, flipped: not polarity[flipped]}
    # A finding flipped to present that the image does not show gets details drawn from its own stream.
    hard = _render(flipped_polarity, case.findings, streams, layout_seed, case.anatomy.ap, config)
    return Report(sentences, hard, tuple(sorted(polarity)), flipped)


def leaks_prompt(text: str) -> bool:
    """Whether ``text`` contains a RE-tune prompt frame (which training text must not)."""
    lower = text.lower()
    return any(frame in lower for frame in PROMPT_FRAMES)
