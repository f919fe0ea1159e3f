"""Options shared by ``retune train`` and ``retune simulate`` (and the other data commands): how a label file is
read, the adaptor kind, LoRA settings and continual learning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from shared.config import ADAPTOR_KINDS, CONTINUAL_METHODS, LORA_PRESETS, LORA_TOWERS, LoraConfig, split_names
from shared.errors import RetuneError

FormatOpt = Annotated[str, typer.Option("--format", help="auto|chexpert|nih|mimic|chestmnist|manifest")]
DiseasesOpt = Annotated[Optional[str], typer.Option(help="Schema (chexpert5, nih14, chexpert14) or comma-separated diseases.")]
UncertainOpt = Annotated[str, typer.Option(help="Uncertain (-1) labels: ignore|ones|zeros.")]
ImageRootOpt = Annotated[Optional[Path], typer.Option(help="Folder image paths are relative to (default: the label file's).")]
OutsideOpt = Annotated[bool, typer.Option(help="Accept image paths that lead outside the image root (refused by default).")]
AdaptorKindOpt = Annotated[str, typer.Option(
    help=f"{'|'.join(ADAPTOR_KINDS)}: RE-tune adaptors on cached embeddings, LoRA inside the backbone's towers "
         "(no embedding cache for an adapted tower), or both.")]
LoraPresetOpt = Annotated[str, typer.Option(help=f"LoRA settings to start from: {'|'.join(LORA_PRESETS)} "
                                                 "(PeFoMed's: r 64, alpha 16, dropout 0.05, q_proj,v_proj).")]
LoraRankOpt = Annotated[Optional[int], typer.Option(help="LoRA rank r (default: the preset's).")]
LoraAlphaOpt = Annotated[Optional[float], typer.Option(help="LoRA alpha; updates are scaled by alpha/r (default: the preset's).")]
LoraDropoutOpt = Annotated[Optional[float], typer.Option(help="Dropout on the LoRA branch (default: the preset's).")]
LoraTargetsOpt = Annotated[Optional[str], typer.Option(help="Comma-separated module names LoRA adapts (default: the preset's).")]
ContinualOpt = Annotated[str, typer.Option(
    help=f"{'|'.join(CONTINUAL_METHODS)}: keep earlier stages' diseases; lwf distils the old diseases' scores of "
         "the model a stage starts from on the stage's own images; replay also trains each hospital on its own "
         "earlier stages' images and labels (auto: replay for class and label schedules).")]
LwfWeightOpt = Annotated[float, typer.Option(min=0.0, help="Weight of a distilled old-disease score (lwf, replay).")]
LoraTowersOpt = Annotated[str, typer.Option(help=f"Towers LoRA adapts, comma-separated: {','.join(LORA_TOWERS)}.")]


def lora_settings(preset: str, rank: int | None, alpha: float | None, dropout: float | None, targets: str | None,
                  towers: str) -> LoraConfig:
    """The preset's LoRA settings with the options given on the command line in place of its values."""
    if preset not in LORA_PRESETS:
        raise RetuneError(f"unknown --lora-preset {preset!r}: choose {', '.join(LORA_PRESETS)}")
    base = LORA_PRESETS[preset]
    return LoraConfig(rank=base.rank if rank is None else rank, alpha=base.alpha if alpha is None else alpha,
                      dropout=base.dropout if dropout is None else dropout,
                      targets=base.targets if targets is None else split_names(targets), towers=split_names(towers))


def lora_fields(lora: LoraConfig) -> dict:
    """``lora`` as :class:`shared.config.FederationConfig` fields."""
    return {"lora_rank": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "lora_targets": ",".join(lora.targets), "lora_towers": ",".join(lora.towers)}
