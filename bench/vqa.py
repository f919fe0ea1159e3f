"""Benchmark: closed VQA through the prompt scoring, on phantom images the federation never saw.

1. ``retune simulate`` with its defaults (5 phantom hospitals of 600 images, 2 stages × 3 rounds, offline default
   backbone) gives the federated checkpoint (``--sim DIR`` reuses a finished run instead).
2. Held-out images: ``--images-per-hospital`` more images of each simulated hospital (same seed and scanner style,
   indices from 600 on, so never trained on), half for calibration, half for the report; ``retune vqa make`` asks
   closed questions about both halves.
3. ``retune vqa evaluate`` on the report half, with the temperature fitted on the calibration half's questions, for
   the federated checkpoint and for the zero-shot backbone (identity adaptors: ``retune train --epochs 0``), beside
   a prior-only baseline (the calibration half's most common answer to the same question text).

Not a test; writes bench/results/vqa.json.

Usage: .venv/bin/python bench/vqa.py [--sim DIR] [--images-per-hospital 100] [--out bench/results/vqa.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from research.phantom import write_phantom  # noqa: E402
from research.vqa import make_questions  # noqa: E402
from shared.config import SimulationPlan  # noqa: E402
from shared.labels import CHEXPERT5  # noqa: E402
from shared.vqa import VqaItem, parse_question, write_items  # noqa: E402

RETUNE = str(Path(sys.executable).parent / "retune")
PLAN = SimulationPlan()


def retune(*args: str) -> str:
    """Run the ``retune`` command; its stdout."""
    return subprocess.run([RETUNE, *args], check=True, capture_output=True, text=True).stdout


def held_out(root: Path, per_hospital: int) -> Path:
    """Images ``600 ..`` of every simulated hospital: the first half ``val`` (calibration), the rest ``test``."""
    rows = []
    for k in range(PLAN.hospitals):
        manifest = write_phantom(root / f"h{k}", per_hospital, hospital=k, seed=0, size=PLAN.image_size,
                                 start=PLAN.images_per_hospital)
        with manifest.open(newline="") as fh:
            for i, row in enumerate(csv.DictReader(fh)):
                split = "val" if i < per_hospital // 2 else "test"
                rows.append({"image": f"h{k}/{row['image']}", "split": split, **{d: row[d] for d in CHEXPERT5}})
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "split", *CHEXPERT5])
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


def prior_baseline(fit: list[VqaItem], report: list[VqaItem]) -> dict:
    """Accuracy of answering each question with ``fit``'s most common answer to the same text (else overall),
    overall, per question type and per form."""
    by_text: dict[str, Counter] = {}
    for item in fit:
        by_text.setdefault(item.question, Counter())[item.answer.lower()] += 1
    overall = Counter(i.answer.lower() for i in fit).most_common(1)[0][0]
    right = [(by_text[i.question].most_common(1)[0][0] if i.question in by_text else overall) == i.answer.lower()
             for i in report]

    def accuracy(keys: list[str]) -> dict[str, float]:
        return {k: sum(r for r, key in zip(right, keys) if key == k) / keys.count(k) for k in sorted(set(keys))}

    return {"accuracy": sum(right) / len(right), "per_question_type": accuracy([i.question_type for i in report]),
            "per_form": accuracy([parse_question(i.question, CHEXPERT5).form for i in report])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sim", type=Path, help="A finished `retune simulate` run folder (default: run one).")
    parser.add_argument("--images-per-hospital", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the question templates.")
    parser.add_argument("--out", type=Path, default=Path("bench/results/vqa.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        sim = args.sim or root / "sim"
        if args.sim is None:
            retune("simulate", "--out", str(sim))
        simulate_s = time.perf_counter() - start
        manifest = held_out(root / "heldout", args.images_per_hospital)
        sets = {}
        for split in ("val", "test"):
            items, _ = make_questions(manifest, args.seed, split)
            write_items(root / f"{split}.json", items)
            sets[split] = items
        cache = str(sim / "cache")
        retune("train", "--data", str(sim / "hospitals/hospital-0/manifest.csv"), "--out", str(root / "zero-shot"),
               "--epochs", "0", "--cache", cache)
        results = {}
        for name, checkpoint in (("federated", sim / "checkpoint"), ("zero_shot", root / "zero-shot")):
            start = time.perf_counter()
            results[name] = json.loads(retune(
                "vqa", "evaluate", "--checkpoint", str(checkpoint), "--questions", str(root / "test.json"),
                "--images", str(root / "heldout"), "--calibrate-on", str(root / "val.json"), "--cache", cache,
                "--json"))
            results[name]["evaluate_s"] = round(time.perf_counter() - start, 1)
            for key in ("checkpoint", "questions_file", "temperature_fitted_on"):
                results[name].pop(key)
    report = {
        "setup": {"checkpoint": "retune simulate defaults (5 phantom hospitals x 600 images at "
                                f"{PLAN.image_size} px, 2 stages x 3 rounds, retune-minilm-phantom)"
                                + (f", reused from {args.sim}" if args.sim else ""),
                  "held_out": f"{args.images_per_hospital} more images per hospital (indices from "
                              f"{PLAN.images_per_hospital}): half fit the temperature, half are reported",
                  "questions": {s: len(v) for s, v in sets.items()}, "question_seed": args.seed,
                  "simulate_s": round(simulate_s, 1),
                  "accuracy": "over answered questions; ECE: 10 bins over every yes/no decision (a which-of "
                              "question makes one per option), at the temperature fitted on the calibration half"},
        **results,
        "prior_baseline": prior_baseline(sets["val"], sets["test"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("federated", "zero_shot", "prior_baseline")}, indent=1))


if __name__ == "__main__":
    main()
