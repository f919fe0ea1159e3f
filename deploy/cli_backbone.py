"""``retune build-backbone``: rebuild the offline default backbone (``retune-minilm-phantom``) from scratch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from research.pretrain.config import BuildConfig

_B = BuildConfig()


def build_backbone(
    out: Annotated[Path, typer.Option("--out", help="Artifact folder to write (shipped: shared/assets/backbones/retune-minilm-phantom).")],
    seed: Annotated[int, typer.Option(help="Seeds phantoms (phantom seed 1000 + seed), reports, init, batches.")] = _B.seed,
    images: Annotated[int, typer.Option(help="Training phantoms.")] = _B.images,
    epochs: Annotated[int, typer.Option(help="Passes over the training phantoms.")] = _B.epochs,
    hospitals: Annotated[int, typer.Option(help="Pretraining hospitals (scanner styles), ids from --first-hospital.")] = _B.hospitals,
    style_family: Annotated[str, typer.Option(help="Style family of the pretraining hospitals: archive (digitised film) or clinical.")] = _B.style_family,
    first_hospital: Annotated[int, typer.Option(help="First pretraining hospital id (keep >= 1000: simulate uses 0..N-1).")] = _B.first_hospital,
    val_images: Annotated[int, typer.Option(help="Held-out phantoms from unseen pretraining-style hospitals.")] = _B.val_images,
    batch_size: int = _B.batch_size, lr: float = _B.lr, weight_decay: float = _B.weight_decay,
    sentence_weight: Annotated[float, typer.Option(help="Weight of the finding-sentence loss (0: CLIP loss only).")] = _B.sentence_weight,
    sentence_balance: Annotated[float, typer.Option(help="Up-weight rare findings in that loss: (neg/pos) ** this.")] = _B.sentence_balance,
    described_mentions: Annotated[float, typer.Option(help="Share of findings described by appearance, without their label's name.")] = _B.described_mentions,
    generic_mentions: Annotated[float, typer.Option(help="Share of present findings stated plainly (no severity/side) in the text.")] = _B.generic_mentions,
    hard_negatives: Annotated[bool, typer.Option(help="Hard-negative reports (one finding flipped) in the CLIP loss.")] = _B.hard_negatives,
    report_variants: Annotated[int, typer.Option(help="Reports written per image (one per epoch, cycled).")] = _B.report_variants,
    tower: Annotated[str, typer.Option(help="Image tower: resnet (open_clip ModifiedResNet) or vit.")] = _B.tower,
    image_size: Annotated[int, typer.Option(help="Model input size in pixels (phantoms are rendered at 128 and resized).")] = _B.image_size,
    width: Annotated[int, typer.Option(help="ResNet stem width / ViT width.")] = _B.width,
    layers: Annotated[int, typer.Option(help="ResNet blocks per stage / ViT layers.")] = _B.layers,
    patch_size: Annotated[int, typer.Option(help="ViT patch size.")] = _B.patch_size,
    embed_dim: Annotated[int, typer.Option(help="Joint embedding size.")] = _B.embed_dim,
    evaluate: Annotated[bool, typer.Option(help="Measure the result on simulate-like hospitals 0..4 (seed 0) and put it in the model card.")] = True,
    eval_images: Annotated[int, typer.Option(help="Phantoms per hospital for that measurement.")] = 600,
    threads: Annotated[Optional[int], typer.Option(help="Torch CPU threads (default: torch's choice). Results are reproducible for a fixed thread count.")] = None,
) -> None:
    """Pretrain the offline default backbone on phantom chest X-rays and write its artifact (config, weights without
    the frozen MiniLM, build record, model card, SHA256SUMS). Deterministic in --seed."""
    import torch

    from research.pretrain.build import build
    from research.pretrain.config import with_overrides

    if threads:
        torch.set_num_threads(threads)
    config = with_overrides(_B, seed=seed, images=images, epochs=epochs, hospitals=hospitals,
                            first_hospital=first_hospital, style_family=style_family, val_images=val_images, batch_size=batch_size, lr=lr,
                            weight_decay=weight_decay, sentence_weight=sentence_weight,
                            sentence_balance=sentence_balance, described_mentions=described_mentions,
                            generic_mentions=generic_mentions,
                            hard_negatives=hard_negatives,
                            report_variants=report_variants, tower=tower, image_size=image_size, width=width,
                            layers=layers, patch_size=patch_size, embed_dim=embed_dim)
    console = Console(stderr=True)
    result = build(config, out, evaluate=evaluate, eval_images=eval_images, console=console)
    record = result.record
    summary = {"out": str(out), "weights_sha256": record["weights_sha256"], "timings": record["timings"],
               "heldout_zero_shot_auroc": record["history"][-1]["heldout_zero_shot_auroc"]}
    if "evaluation" in record:
        summary["simulate_like"] = {"zero_shot": record["evaluation"]["zero_shot"]["macro_auroc"],
                                    "adaptors": record["evaluation"]["adaptors"]["macro_auroc"]}
    console.print(f"wrote {out} in {record['timings']['wall_s'] / 60:.1f} min; use it with --backbone {out}")
    print(json.dumps(summary, indent=2))
