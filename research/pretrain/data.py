"""Pretraining data for ``retune build-backbone``: phantoms rendered into memory, reports and hard negatives, the
finding-sentence bank, frozen MiniLM sentence features, and the training augmentation."""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from shared.labels import CHEXPERT5
from shared.artifact import minilm_dir
from research.pretrain.config import MEAN, STD, BuildConfig
from research.pretrain.reports import (
    DESCRIBED_ABSENT,
    NEGATIVE,
    ReportConfig,
    finding_sentence,
    leaks_prompt,
    write_report,
)


def to_model_size(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 phantom as open_clip's preprocess does (PIL bicubic, shortest side; square in, square out)."""
    from PIL import Image

    if image.shape == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def _render_chunk(args: tuple[list[int], list[int], int, str, int, int]) -> tuple[np.ndarray, np.ndarray]:
    from research.phantom import render_case, sample_case

    indices, hospitals, seed, family, render_size, size = args
    cases = [sample_case(i, h, seed, family) for i, h in zip(indices, hospitals)]
    return (np.stack([to_model_size(render_case(c, render_size), size) for c in cases]),
            np.stack([c.observed for c in cases]))


def render_phantoms(indices: list[int], hospitals: list[int], seed: int, family: str, render_size: int, size: int,
                    workers: int, advance: Callable[[int], None] = lambda n: None) -> tuple[np.ndarray, np.ndarray]:
    """Images of style ``family`` rendered at ``render_size`` and resized to uint8 [n, size, size], and report
    labels [n, 5]; deterministic whatever ``workers`` is."""
    chunks = [(indices[i:i + 128], hospitals[i:i + 128], seed, family, render_size, size)
              for i in range(0, len(indices), 128)]
    images = np.empty((len(indices), size, size), dtype=np.uint8)
    labels = np.empty((len(indices), len(CHEXPERT5)), dtype=np.float32)
    parallel = workers > 1 and len(chunks) > 1
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) if parallel else nullcontext() as pool:
        k = 0
        for imgs, labs in (pool.map if pool else map)(_render_chunk, chunks):
            images[k:k + len(imgs)], labels[k:k + len(imgs)] = imgs, labs
            k += len(imgs)
            advance(len(imgs))
    return images, labels


def sentence_bank(seed: int, config: ReportConfig, per_disease: int = 40) -> dict[str, list[list[str]]]:
    """Training single-finding sentences: ``{disease: [positive sentences, negative sentences]}`` (no RE-tune prompt),
    phrased with the reports' mix (``config``)."""
    from research.phantom.findings import Findings

    rng = np.random.default_rng((seed, 0x5E47))
    bank = {}
    for d, disease in enumerate(CHEXPERT5):
        streams = [np.random.default_rng(int(s)) for s in rng.integers(2**62, size=per_disease)]
        positives = sorted({finding_sentence(d, True, Findings(), r, config) for r in streams})
        negatives = list(NEGATIVE[d]) + (list(DESCRIBED_ABSENT[d]) if config.described > 0 else [])
        bank[disease] = [positives, negatives]
    return bank


@torch.inference_mode()
def encode_pooled(model: torch.nn.Module, texts: list[str], context_length: int, batch: int = 128,
                  advance: Callable[[int], None] = lambda n: None) -> torch.Tensor:
    """Mean-pooled frozen MiniLM features [len(texts), 384] (before the trainable projection), fp32."""
    from open_clip.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(str(minilm_dir()), context_length=context_length)
    tokens = tokenizer(texts)
    lengths = (tokens != 0).sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    out = torch.empty(len(texts), model.text.transformer.config.hidden_size)
    text = model.text
    for start in range(0, len(texts), batch):
        rows = order[start:start + batch]
        width = int(lengths[rows].max())
        ids = tokens[rows, :width]
        mask = (ids != text.config.pad_token_id).long()
        out[rows] = text.pooler(text.transformer(input_ids=ids, attention_mask=mask), mask).float()
        advance(len(rows))
    return out


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of uint8 images [B, S, S] -> float [B, 1, S, S] in [0, 1]: pose and exposure jitter.

    No horizontal flip: the reports name sides.
    """
    x = batch.float().div_(255.0).unsqueeze(1)
    b = len(x)
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    angle = (rand(b) - 0.5) * math.radians(8.0)
    scale = 1.0 + (rand(b) - 0.5) * 0.16
    shift = (rand(b, 2) - 0.5) * 0.1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gamma = torch.exp((rand(b, 1, 1, 1) - 0.5) * 0.5)
    x = x.clamp_(1e-4, 1.0).pow_(gamma)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * (0.85 + 0.3 * rand(b, 1, 1, 1)) + mean + (rand(b, 1, 1, 1) - 0.5) * 0.08
    x = x + torch.randn(x.shape, generator=generator) * (rand(b, 1, 1, 1) * 0.02)
    return x.clamp_(0.0, 1.0)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] in [0, 1] -> the model input [B, 3, S, S], as open_clip's preprocess makes it."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


@dataclass
class PreparedData:
    images: torch.Tensor  # uint8 [N, S, S]
    labels: torch.Tensor  # float [N, 5] report labels
    report: torch.Tensor  # long [V, N, M]: sentence rows of each image's report per variant, -1 = padding
    hard: torch.Tensor  # long [V, N, M]: the same for its hard negative (all -1 when it has none)
    weights: torch.Tensor  # float [T]: tokens per sentence (a report's feature is the token-weighted mean)
    features: torch.Tensor  # [T, 384] pooled MiniLM features of every distinct sentence
    sentence_index: list[tuple[list[int], list[int]]]  # per disease: rows of positive and negative bank sentences
    val_images: torch.Tensor
    val_labels: torch.Tensor
    prompts: torch.Tensor  # pooled features of the RE-tune prompts (monitoring only)
    prompt_averaging: torch.Tensor
    timings: dict[str, float]
    n_reports: int

    def texts(self, rows: torch.Tensor) -> torch.Tensor:
        """Pooled report features [B, 384]: token-weighted means of sentence features (``rows`` [B, M], -1 pad)."""
        valid = rows >= 0
        w = self.weights[rows.clamp(min=0)] * valid
        return (self.features[rows.clamp(min=0)] * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1e-6)


def sentence_averaging(index: list[tuple[list[int], list[int]]], n: int) -> torch.Tensor:
    m = torch.zeros(2 * len(index), n)
    for c, (pos, neg) in enumerate(index):
        m[2 * c, pos] = 1.0 / len(pos)
        m[2 * c + 1, neg] = 1.0 / len(neg)
    return m


def _padded(rows: list[list[int]]) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def prepare(config: BuildConfig, model: torch.nn.Module, progress: Progress, workers: int) -> PreparedData:
    """Render the phantoms, write the reports and embed every distinct sentence with the frozen MiniLM."""
    from open_clip.tokenizer import HFTokenizer

    from research.phantom import sample_case
    from shared.prompts import PromptBank

    timings = {}
    start = time.perf_counter()
    n, nv = config.images, config.val_images
    task = progress.add_task("rendering phantoms", total=n + nv, info="")
    advance = lambda k: progress.advance(task, k)  # noqa: E731
    shape = (config.phantom_seed, config.style_family, config.render_size, config.image_size, workers, advance)
    images, labels = render_phantoms(list(range(n)), [config.hospital_of(i) for i in range(n)], *shape)
    val_images, val_labels = render_phantoms(list(range(nv)), [config.val_hospital_of(i) for i in range(nv)], *shape)
    timings["render_s"] = time.perf_counter() - start

    start = time.perf_counter()
    report_config = config.report_config()
    vocabulary: dict[str, int] = {}
    ids = lambda sentences: [vocabulary.setdefault(t, len(vocabulary)) for t in sentences]  # noqa: E731
    task = progress.add_task("writing reports", total=n * config.report_variants, info="")
    reports, hards = [], []
    for v in range(config.report_variants):
        report_rows, hard_rows = [], []
        for i in range(n):
            case = sample_case(i, config.hospital_of(i), config.phantom_seed, config.style_family)
            report = write_report(case, np.random.default_rng((config.seed, 0x9E9, v, i)), report_config)
            report_rows.append(ids(report.sentences))
            hard_rows.append(ids(report.hard_sentences))
        reports.append(_padded(report_rows))
        hards.append(_padded(hard_rows))
        progress.advance(task, n)
    width = max(r.shape[1] for r in reports + hards)
    pad = lambda t: F.pad(t, (0, width - t.shape[1]), value=-1)  # noqa: E731
    bank = sentence_bank(config.seed, report_config)
    sentence_index = [(ids(bank[d][0]), ids(bank[d][1])) for d in CHEXPERT5]
    sentences = list(vocabulary)
    leaked = [t for t in sentences if leaks_prompt(t)]
    assert not leaked, f"training text holds a RE-tune prompt frame: {leaked[:2]}"
    timings["reports_s"] = time.perf_counter() - start

    start = time.perf_counter()
    prompt_bank = PromptBank(CHEXPERT5)
    prompt_texts = prompt_bank.texts()
    total = len(sentences) + len(prompt_texts)
    task = progress.add_task("embedding sentences (frozen MiniLM)", total=total, info=f"{total} distinct")
    advance = lambda k: progress.advance(task, k)  # noqa: E731
    features = encode_pooled(model, sentences, config.context_length, advance=advance)
    prompts = encode_pooled(model, prompt_texts, config.context_length, advance=advance)
    tokens = HFTokenizer(str(minilm_dir()), context_length=config.context_length)(sentences)
    weights = ((tokens != 0).sum(1) - 2).clamp(min=1).float()
    timings["texts_s"] = time.perf_counter() - start
    return PreparedData(
        images=torch.from_numpy(images), labels=torch.from_numpy(labels),
        report=torch.stack([pad(r) for r in reports]), hard=torch.stack([pad(h) for h in hards]), weights=weights,
        features=features, sentence_index=sentence_index, val_images=torch.from_numpy(val_images),
        val_labels=torch.from_numpy(val_labels), prompts=prompts, prompt_averaging=prompt_bank.averaging_matrix(),
        timings=timings, n_reports=n * config.report_variants)
