"""Build the offline default backbone: contrastive pretraining of a small image tower against the frozen MiniLM.

The recipe (every step deterministic in ``BuildConfig.seed``):

1. Render phantom chest X-rays once into memory (uint8) from *pretraining hospitals* ``first_hospital ..
   first_hospital + hospitals - 1`` (default 1000..1199) under phantom seed ``1000 + seed``, drawn from the
   ``archive`` style family (digitised film, higher prevalence): 200 scanner styles of a kind ``retune simulate``
   (``clinical`` hospitals 0..N-1, seed 0 by default) never generates, so a federation built on this backbone
   still has a domain gap to close. A further set of unseen pretraining-style hospitals is held out for monitoring.
2. Write reports and their hard negatives for every image (:mod:`research.pretrain.reports`; many describe a finding
   by its appearance rather than name it, so the RE-tune prompts, which name it, meet a language gap), plus a bank of
   single-finding sentences, and embed every distinct text once with the frozen MiniLM (mean pooling): the text
   transformer is locked, so its pooled output is a constant of the text.
3. Train the image tower (open_clip's ModifiedResNet by default), the text projection and the logit scale with a
   CLIP loss (image to report, with each image's hard-negative report as an extra candidate; report to image) plus
   a finding-sentence loss: per disease, the image is scored as cos(img, mean positive sentences) − cos(img, mean negative sentences)
   over sentences sampled from the training bank and trained with BCE on the report labels. Neither loss sees a
   RE-tune prompt sentence.
4. Write the artifact (:mod:`shared.artifact`): config, trained weights without MiniLM, build record,
   model card, SHA256SUMS.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from shared.labels import CHEXPERT5
from shared.artifact import (
    CARD_FILE,
    CONFIG_FILE,
    MINILM_ID,
    MINILM_PACKAGE,
    TEXT_PREFIX,
    WEIGHTS_FILE,
    minilm_dir,
    sha256_file,
    write_sums,
)
from research.pretrain.config import ARTIFACT_NAME, BuildConfig, model_config, preprocess_config
from research.pretrain.data import PreparedData, augment, normalise, prepare, sentence_averaging

BUILD_FILE = "build.json"


def create_model(config: BuildConfig) -> torch.nn.Module:
    """The open_clip model to train: MiniLM weights from the installed package, everything else initialised."""
    from open_clip.model import CustomTextCLIP

    cfg = model_config(config)
    text_cfg = {**cfg["text_cfg"], "hf_model_name": str(minilm_dir()), "hf_model_pretrained": True}
    vision_cfg = dict(cfg["vision_cfg"])
    import transformers

    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model = CustomTextCLIP(embed_dim=cfg["embed_dim"], vision_cfg=vision_cfg, text_cfg=text_cfg)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    for p in model.text.proj.parameters():
        p.requires_grad_(True)
    return model


# --- training -----------------------------------------------------------------------------------------------------
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
        bank = zero_shot_auroc(val, data.features, sentence_averaging(data.sentence_index, len(data.features)),
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
    os.chmod(out / WEIGHTS_FILE, 0o644)
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
          console: Console | None = None, show_progress: bool = True, workers: int | None = None,
          command_out: str | None = None) -> BuildResult:
    """Train the backbone and write its artifact to ``out``; optionally measure it on simulate-like hospitals.

    ``command_out`` is the ``--out`` written into the recorded command when the artifact is built in a scratch
    folder and moved to its final place afterwards (the folder does not change the weights).
    """
    from research.pretrain.card import model_card

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
        "command": config.command(command_out or out), "config": asdict(config), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "training_images": len(data.images), "reports": data.n_reports,
        "distinct_sentences": len(data.features),
        "parameters": {"image_tower": sum(p.numel() for p in model.visual.parameters()),
                       "text_projection": sum(p.numel() for p in model.text.proj.parameters()),
                       "text_transformer_frozen": sum(p.numel() for p in model.text.transformer.parameters())},
        "timings": {**{k: round(v, 1) for k, v in data.timings.items()}, "train_s": round(trained["train_s"], 1)},
        "history": trained["history"], "weights_sha256": sha256_file(out / WEIGHTS_FILE),
    }
    if evaluate:
        from research.pretrain.evaluate import evaluate_artifact

        start = time.perf_counter()
        with console.status("measuring on simulate-like hospitals (0..4, seed 0)"):
            record["evaluation"] = evaluate_artifact(out, images_per_hospital=eval_images)
        record["timings"]["evaluate_s"] = round(time.perf_counter() - start, 1)
    record["timings"]["wall_s"] = round(time.perf_counter() - wall, 1)
    (out / BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (out / CARD_FILE).write_text(model_card(record, (out / WEIGHTS_FILE).stat().st_size))
    write_sums(out, [CONFIG_FILE, WEIGHTS_FILE, BUILD_FILE, CARD_FILE])
    return BuildResult(out, record, model)
