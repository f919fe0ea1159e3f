"""Build the offline default backbone: contrastive pretraining of a small image tower against the frozen MiniLM.

The recipe (every step deterministic in ``BuildConfig.seed``):

1. Render phantom chest X-rays once into memory (uint8) from *pretraining hospitals* ``first_hospital ..
   first_hospital + hospitals - 1`` (default 1000..1199) under phantom seed ``1000 + seed``: 200 scanner styles and
   prevalence skews that ``retune simulate`` (hospitals 0..N-1, seed 0 by default) never uses, so a federation built
   on this backbone still has a domain gap to close. A further set of unseen pretraining-style hospitals is held
   out for monitoring.
2. Write a report and its hard negative for every image (:mod:`shared.pretrain.reports`), plus a bank of
   single-finding sentences, and embed every distinct text once with the frozen MiniLM (mean pooling): the text
   transformer is locked, so its pooled output is a constant of the text.
3. Train the image tower (an open_clip ViT), the text projection and the logit scale with a CLIP loss (image to
   report, with each image's hard-negative report as an extra candidate; report to image) plus a finding-sentence
   loss: per disease, the image is scored as cos(img, mean positive sentences) − cos(img, mean negative sentences)
   over sentences sampled from the training bank and trained with BCE on the report labels. Neither loss sees a
   RE-tune prompt sentence.
4. Write the artifact (:mod:`shared.pretrain.artifact`): config, trained weights without MiniLM, build record,
   model card, SHA256SUMS.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from shared.labels import CHEXPERT5
from shared.pretrain.artifact import (CARD_FILE, CONFIG_FILE, MINILM_ID, MINILM_PACKAGE, TEXT_PREFIX, WEIGHTS_FILE,
                                      minilm_dir, sha256_file, write_sums)
from shared.pretrain.reports import NEGATIVE, POSITIVE, ReportConfig, leaks_prompt, write_report

BUILD_FILE = "build.json"
ARTIFACT_NAME = "retune-minilm-phantom"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@dataclass(frozen=True)
class BuildConfig:
    """What ``retune build-backbone`` trains; the defaults build the shipped ``retune-minilm-phantom``.

    Parameters
    ----------
    seed : int
        Seeds everything: phantom seed ``1000 + seed``, reports, initialisation, batches, augmentation (default 0).
    images : int
        Training phantoms, spread round-robin over the pretraining hospitals (default 16000).
    hospitals, first_hospital : int
        Pretraining hospitals ``first_hospital .. first_hospital + hospitals - 1`` (default 200 from 1000).
    val_images : int
        Held-out phantoms from 8 further unseen pretraining-style hospitals, scored each epoch (default 800).
    render_size : int
        Phantom size in pixels (default 128, the size ``retune simulate`` writes).
    image_size : int
        Model input size: phantoms are resized to it exactly as open_clip's preprocess does (default 64).
    epochs, batch_size, lr, weight_decay, warmup : training schedule (AdamW, linear warm-up, cosine decay).
    sentence_weight : float
        Weight of the finding-sentence loss beside the CLIP loss (default 1.0; 0 turns it off).
    sentence_balance : float
        Positive weight of each finding in that loss is ``(negatives / positives) ** sentence_balance`` (capped at
        8), so rare findings count (default 1.0; 0 = unweighted).
    hard_negatives : bool
        Add each image's hard-negative report as a CLIP candidate (default True).
    report_variants : int
        Reports written per image; epoch ``e`` uses variant ``e mod report_variants`` (default 3).
    tower : {"resnet", "vit"}
        open_clip's own ``ModifiedResNet`` (``layers`` bottleneck blocks in each of 4 stages, stem width ``width``,
        attention pooling with heads of ``head_width``) or ``VisionTransformer`` (``layers`` blocks of ``width``,
        ``patch_size``, ``mlp_ratio``); default a ResNet of width 16, one block per stage.
    embed_dim : int
        Joint embedding size (default 256).
    context_length : int
        Tokens per text (default 64).
    """

    seed: int = 0
    images: int = 16000
    hospitals: int = 200
    first_hospital: int = 1000
    val_images: int = 800
    render_size: int = 128
    image_size: int = 64
    epochs: int = 12
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05
    sentence_weight: float = 1.0
    sentence_balance: float = 1.0
    hard_negatives: bool = True
    report_variants: int = 3
    tower: str = "resnet"
    width: int = 16
    layers: int = 1
    head_width: int = 64
    patch_size: int = 16
    mlp_ratio: float = 2.0
    embed_dim: int = 256
    context_length: int = 64

    @property
    def phantom_seed(self) -> int:
        return 1000 + self.seed

    def hospital_of(self, i: int) -> int:
        return self.first_hospital + i % self.hospitals

    def val_hospital_of(self, i: int) -> int:
        return self.first_hospital + self.hospitals + i % 8

    def command(self, out: Path | str) -> str:
        """The ``retune build-backbone`` command line that rebuilds this configuration."""
        default = BuildConfig()
        args = [f"--{f.name.replace('_', '-')} {getattr(self, f.name)}" for f in fields(self)
                if f.name != "seed" and getattr(self, f.name) != getattr(default, f.name)]
        return " ".join(["retune build-backbone", f"--out {out}", f"--seed {self.seed}", *args])


def model_config(config: BuildConfig) -> dict[str, Any]:
    """The open_clip ``model_cfg``: a small ViT image tower and the MiniLM HF text tower (mean pooling, linear proj)."""
    if config.tower == "resnet":
        vision = {"image_size": config.image_size, "layers": [config.layers] * 4, "width": config.width,
                  "head_width": config.head_width}
    elif config.tower == "vit":
        vision = {"image_size": config.image_size, "layers": config.layers, "width": config.width,
                  "head_width": config.head_width, "patch_size": config.patch_size, "mlp_ratio": config.mlp_ratio}
    else:
        raise ValueError(f"unknown image tower {config.tower!r}: resnet or vit")
    return {
        "embed_dim": config.embed_dim,
        "vision_cfg": vision,
        "text_cfg": {"hf_model_name": MINILM_ID, "hf_tokenizer_name": MINILM_ID, "hf_proj_type": "linear",
                     "hf_pooler_type": "mean_pooler", "context_length": config.context_length},
        "custom_text": True,
    }


def preprocess_config(config: BuildConfig) -> dict[str, Any]:
    return {"size": config.image_size, "mode": "RGB", "mean": list(MEAN), "std": list(STD),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def create_model(config: BuildConfig) -> torch.nn.Module:
    """The open_clip model to train: MiniLM weights from the installed package, everything else initialised."""
    from open_clip.model import CustomTextCLIP

    cfg = model_config(config)
    text_cfg = {**cfg["text_cfg"], "hf_model_name": str(minilm_dir()), "hf_model_pretrained": True}
    vision_cfg = dict(cfg["vision_cfg"])
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = CustomTextCLIP(embed_dim=cfg["embed_dim"], vision_cfg=vision_cfg, text_cfg=text_cfg)
    finally:
        transformers.logging.set_verbosity(verbosity)
    model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    for p in model.text.proj.parameters():
        p.requires_grad_(True)
    return model


# --- data ---------------------------------------------------------------------------------------------------------
def to_model_size(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 phantom as open_clip's preprocess does (PIL bicubic, shortest side; square in, square out)."""
    from PIL import Image

    if image.shape == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def _render_chunk(args: tuple[list[int], list[int], int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    from shared.phantom import render_case, sample_case

    indices, hospitals, seed, render_size, size = args
    cases = [sample_case(i, h, seed) for i, h in zip(indices, hospitals)]
    return (np.stack([to_model_size(render_case(c, render_size), size) for c in cases]),
            np.stack([c.observed for c in cases]))


def render_phantoms(indices: list[int], hospitals: list[int], seed: int, render_size: int, size: int, workers: int,
                    advance: Callable[[int], None] = lambda n: None) -> tuple[np.ndarray, np.ndarray]:
    """Images rendered at ``render_size`` and resized to uint8 [n, size, size], and report labels [n, 5];
    deterministic whatever ``workers`` is."""
    chunks = [(indices[i:i + 128], hospitals[i:i + 128], seed, render_size, size)
              for i in range(0, len(indices), 128)]
    images = np.empty((len(indices), size, size), dtype=np.uint8)
    labels = np.empty((len(indices), len(CHEXPERT5)), dtype=np.float32)
    k = 0
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            results = pool.map(_render_chunk, chunks)
            for imgs, labs in results:
                images[k:k + len(imgs)], labels[k:k + len(imgs)] = imgs, labs
                k += len(imgs)
                advance(len(imgs))
    else:
        for chunk in chunks:
            imgs, labs = _render_chunk(chunk)
            images[k:k + len(imgs)], labels[k:k + len(imgs)] = imgs, labs
            k += len(imgs)
            advance(len(imgs))
    return images, labels


def sentence_bank(seed: int, per_disease: int = 40) -> dict[str, list[list[str]]]:
    """Training single-finding sentences: ``{disease: [positive sentences, negative sentences]}`` (no RE-tune prompt)."""
    from shared.phantom.findings import Findings

    rng = np.random.default_rng((seed, 0x5E47))
    bank = {}
    for d, disease in enumerate(CHEXPERT5):
        positives = sorted({POSITIVE[d](Findings(), np.random.default_rng(int(s)))
                            for s in rng.integers(2**62, size=per_disease)})
        bank[disease] = [positives, list(NEGATIVE[d])]
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


# --- training -----------------------------------------------------------------------------------------------------
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


def _sentence_averaging(index: list[tuple[list[int], list[int]]], n: int) -> torch.Tensor:
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

    from shared.phantom import sample_case
    from shared.prompts import PromptBank

    timings = {}
    start = time.perf_counter()
    n, nv = config.images, config.val_images
    task = progress.add_task("rendering phantoms", total=n + nv, info="")
    advance = lambda k: progress.advance(task, k)  # noqa: E731
    images, labels = render_phantoms(list(range(n)), [config.hospital_of(i) for i in range(n)],
                                     config.phantom_seed, config.render_size, config.image_size, workers, advance)
    val_images, val_labels = render_phantoms(list(range(nv)), [config.val_hospital_of(i) for i in range(nv)],
                                             config.phantom_seed, config.render_size, config.image_size, workers,
                                             advance)
    timings["render_s"] = time.perf_counter() - start

    start = time.perf_counter()
    report_config = ReportConfig()
    vocabulary: dict[str, int] = {}
    ids = lambda sentences: [vocabulary.setdefault(t, len(vocabulary)) for t in sentences]  # noqa: E731
    task = progress.add_task("writing reports", total=n * config.report_variants, info="")
    reports, hards = [], []
    for v in range(config.report_variants):
        report_rows, hard_rows = [], []
        for i in range(n):
            case = sample_case(i, config.hospital_of(i), config.phantom_seed)
            report = write_report(case, np.random.default_rng((config.seed, 0x9E9, v, i)), report_config)
            report_rows.append(ids(report.sentences))
            hard_rows.append(ids(report.hard_sentences))
        reports.append(_padded(report_rows))
        hards.append(_padded(hard_rows))
        progress.advance(task, n)
    width = max(r.shape[1] for r in reports + hards)
    pad = lambda t: F.pad(t, (0, width - t.shape[1]), value=-1)  # noqa: E731
    bank = sentence_bank(config.seed)
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


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "positional_embedding" in name or "class_embedding" in name or "logit" in name
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _embed_val(model: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        out = torch.cat([F.normalize(model.visual(normalise(images[i:i + batch].float().div(255.0).unsqueeze(1))), dim=-1)
                         for i in range(0, len(images), batch)])
    model.train()
    return out


def zero_shot_auroc(image: torch.Tensor, pooled: torch.Tensor, averaging: torch.Tensor, proj: torch.nn.Module,
                    labels: np.ndarray) -> dict:
    """Per-disease and macro AUROC of cos(img, pos) − cos(img, neg) with pooled text features through ``proj``."""
    from shared.metrics import per_class_auroc

    with torch.inference_mode():
        text = F.normalize(proj(pooled), dim=-1)
        d = F.normalize(averaging @ text, dim=-1).view(-1, 2, text.shape[-1])
        logits = (image @ d[:, 0].T - image @ d[:, 1].T).numpy()
    per = per_class_auroc(logits, labels, CHEXPERT5)
    defined = [v for v in per.values() if v is not None]
    return {"macro": float(np.mean(defined)) if defined else None, "per_class": per}


def train(config: BuildConfig, model: torch.nn.Module, data: PreparedData, progress: Progress,
          log: Callable[[str], None]) -> dict:
    """Contrastive training; returns the history (loss and held-out zero-shot AUROC per epoch)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    n = len(data.images)
    steps_per_epoch = n // config.batch_size
    total = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup * total))
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    sentence_scale = 10.0
    prevalence = data.labels.mean(0).clamp(1e-3, 1 - 1e-3)
    pos_weight = ((1 - prevalence) / prevalence).clamp(max=8.0) ** config.sentence_balance
    proj = model.text.proj
    history: list[dict] = []
    task = progress.add_task("training image tower", total=total, info="")
    model.train()
    model.text.eval()
    model.visual.to(memory_format=torch.channels_last)  # about 1.5x faster CPU convolutions
    seen, start = 0, time.perf_counter()
    for epoch in range(config.epochs):
        perm = torch.randperm(n, generator=generator)
        variant = epoch % config.report_variants
        running, count = 0.0, 0
        for step in range(steps_per_epoch):
            rows = perm[step * config.batch_size:(step + 1) * config.batch_size]
            x = normalise(augment(data.images[rows], generator)).contiguous(memory_format=torch.channels_last)
            img = F.normalize(model.visual(x), dim=-1)
            rep = F.normalize(proj(data.texts(data.report[variant, rows])), dim=-1)
            scale = model.logit_scale.exp().clamp(max=100.0)
            targets = torch.arange(len(rows))
            candidates = rep
            if config.hard_negatives:
                has_hard = (data.hard[variant, rows] >= 0).any(1)
                hard = F.normalize(proj(data.texts(data.hard[variant, rows])), dim=-1)
                candidates = torch.cat([rep, hard])
            logits_i = scale * img @ candidates.T
            if config.hard_negatives:
                logits_i[:, len(rows):] = logits_i[:, len(rows):].masked_fill(~has_hard.unsqueeze(0), float("-inf"))
            loss = 0.5 * (F.cross_entropy(logits_i, targets) + F.cross_entropy(scale * rep @ img.T, targets))
            if config.sentence_weight > 0:
                picks = []
                for pos, neg in data.sentence_index:
                    picks.append(torch.tensor(pos)[torch.randperm(len(pos), generator=generator)[:4]])
                    picks.append(torch.tensor(neg)[torch.randperm(len(neg), generator=generator)[:4]])
                sent = F.normalize(proj(data.features[torch.cat(picks)]), dim=-1)
                d = F.normalize(sent.view(len(picks), 4, -1).mean(1), dim=-1).view(-1, 2, sent.shape[-1])
                score = sentence_scale * (img @ d[:, 0].T - img @ d[:, 1].T)
                loss = loss + config.sentence_weight * F.binary_cross_entropy_with_logits(score, data.labels[rows],
                                                                                      pos_weight=pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, math.log(100.0))
            running += float(loss.detach())
            count += 1
            seen += len(rows)
            rate = seen / (time.perf_counter() - start)
            progress.update(task, advance=1, info=f"epoch {epoch + 1}/{config.epochs} loss {running / count:.3f} "
                                                  f"{rate:.0f} img/s")
        val = _embed_val(model, data.val_images)
        labels = data.val_labels.numpy()
        zs = zero_shot_auroc(val, data.prompts, data.prompt_averaging, proj, labels)
        bank = zero_shot_auroc(val, data.features, _sentence_averaging(data.sentence_index, len(data.features)),
                               proj, labels)
        record = {"epoch": epoch + 1, "loss": running / max(1, count), "heldout_zero_shot_auroc": zs["macro"],
                  "heldout_training_sentences_auroc": bank["macro"], "logit_scale": float(model.logit_scale.detach().exp())}
        history.append(record)
        log(f"epoch {epoch + 1}: loss {record['loss']:.3f}, held-out zero-shot macro-AUROC {zs['macro']:.3f} "
            f"(training sentences {bank['macro']:.3f})")
    history[-1]["heldout_zero_shot_per_class"] = zs["per_class"]
    model.visual.to(memory_format=torch.contiguous_format)
    return {"history": history, "train_s": time.perf_counter() - start, "steps": total}


# --- artifact -----------------------------------------------------------------------------------------------------
def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight except the frozen MiniLM text transformer (fp32)."""
    return {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()
            if not k.startswith(TEXT_PREFIX)}


def write_weights(model: torch.nn.Module, config: BuildConfig, out: Path) -> None:
    """Write ``open_clip_config.json`` and the trained weights (deterministic bytes for a deterministic model)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(trained_state(model), out / WEIGHTS_FILE, metadata={"format": "pt"})
    text_weights = minilm_dir() / "model.safetensors"
    doc = {
        "model_cfg": model_config(config),
        "preprocess_cfg": preprocess_config(config),
        "retune": {
            "name": ARTIFACT_NAME,
            "text_tower": {"model": MINILM_ID, "package": f"{MINILM_PACKAGE}=={_package_version()}",
                           "licence": "Apache-2.0", "frozen": True, "shipped": False},
            "text_weights_sha256": sha256_file(text_weights),
            "build": {**asdict(config), "phantom_seed": config.phantom_seed},
        },
    }
    (out / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(MINILM_PACKAGE)
    except PackageNotFoundError:
        return "unknown"


@dataclass
class BuildResult:
    out: Path
    record: dict
    model: torch.nn.Module


def build(config: BuildConfig, out: Path, evaluate: bool = True, eval_images: int = 600,
          console: Console | None = None, show_progress: bool = True, workers: int | None = None) -> BuildResult:
    """Train the backbone and write its artifact to ``out``; optionally measure it on simulate-like hospitals."""
    from shared.pretrain.card import model_card

    console = console or Console(stderr=True)
    out = Path(out)
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    wall = time.perf_counter()
    torch.manual_seed(config.seed)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not show_progress) as progress:
        model = create_model(config)
        data = prepare(config, model, progress, workers)
        log = (lambda msg: progress.console.print(msg)) if show_progress else (lambda msg: None)
        trained = train(config, model, data, progress, log)
    model.eval()
    write_weights(model, config, out)
    write_sums(out, [CONFIG_FILE, WEIGHTS_FILE])
    record: dict[str, Any] = {
        "command": config.command(out), "config": asdict(config), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "training_images": len(data.images), "reports": data.n_reports,
        "distinct_sentences": len(data.features),
        "parameters": {"image_tower": sum(p.numel() for p in model.visual.parameters()),
                       "text_projection": sum(p.numel() for p in model.text.proj.parameters()),
                       "text_transformer_frozen": sum(p.numel() for p in model.text.transformer.parameters())},
        "timings": {**{k: round(v, 1) for k, v in data.timings.items()}, "train_s": round(trained["train_s"], 1)},
        "history": trained["history"], "weights_sha256": sha256_file(out / WEIGHTS_FILE),
    }
    if evaluate:
        from shared.pretrain.evaluate import evaluate_artifact

        start = time.perf_counter()
        with console.status("measuring on simulate-like hospitals (0..4, seed 0)"):
            record["evaluation"] = evaluate_artifact(out, images_per_hospital=eval_images)
        record["timings"]["evaluate_s"] = round(time.perf_counter() - start, 1)
    record["timings"]["wall_s"] = round(time.perf_counter() - wall, 1)
    (out / BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (out / CARD_FILE).write_text(model_card(record, (out / WEIGHTS_FILE).stat().st_size))
    write_sums(out, [CONFIG_FILE, WEIGHTS_FILE, BUILD_FILE, CARD_FILE])
    return BuildResult(out, record, model)


def with_overrides(config: BuildConfig, **overrides: Any) -> BuildConfig:
    """``config`` with the given fields replaced (None values ignored)."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
