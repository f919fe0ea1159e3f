"""``retune simulate``: the researchers' main job, a federation of phantom hospitals on one machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from deploy.cli_options import (AdaptorKindOpt, ContinualOpt, LwfWeightOpt, LoraAlphaOpt, LoraDropoutOpt, LoraPresetOpt, LoraRankOpt, LoraTargetsOpt,
                             LoraTowersOpt, lora_fields, lora_settings)
from shared.config import STRATEGIES, FederationConfig, SimulationPlan
from shared.errors import RetuneError

_F, _P = FederationConfig(), SimulationPlan()


def _hospital_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise RetuneError(f"--dp-hospitals {text!r}: expected hospital numbers separated by commas, e.g. 0,2") from None


def simulate(
    out: Annotated[Path, typer.Option(help="Run folder: report.json, report.html, checkpoint/, hospitals/, cache/.")] = Path("runs/simulate"),
    hospitals: Annotated[int, typer.Option(help="Simulated hospitals (phantom data, each its own scanner style).")] = _P.hospitals,
    stages: int = _F.stages, rounds_per_stage: int = _F.rounds_per_stage, local_epochs: int = _F.local_epochs,
    scenario: Annotated[str, typer.Option(help="data|class|label|joint (joint: one stage).")] = _F.scenario,
    strategy: Annotated[str, typer.Option(help="|".join(STRATEGIES) + ".")] = _F.strategy,
    min_hospitals: Annotated[int, typer.Option(help="Updates a round needs to count (0: every hospital's that labels a disease of each stage; with --poison one fewer).")] = 0,
    max_update_norm: Annotated[float, typer.Option(help="Refuse an update whose norm exceeds this × the global adaptors' (0: off).")] = _F.max_update_norm,
    max_weight_ratio: Annotated[float, typer.Option(help="Cap a hospital's example count at this × the round's median (0: off).")] = _F.max_weight_ratio,
    trim_fraction: Annotated[float, typer.Option(help="fedtrimmedavg: fraction cut off each tail.")] = _F.trim_fraction,
    byzantine_hospitals: Annotated[int, typer.Option(help="krum|multikrum|bulyan: hospitals assumed Byzantine (-1: the most tolerated).")] = _F.byzantine_hospitals,
    backbone: Annotated[str, typer.Option(help="biomedclip, hf-hub:ID, a local open_clip directory, or an open_clip name.")] = _F.backbone,
    seed: int = _F.seed,
    images_per_hospital: int = _P.images_per_hospital,
    image_size: Annotated[int, typer.Option(help="Phantom image size in pixels.")] = _P.image_size,
    dp_epsilon: Annotated[Optional[float], typer.Option(help="DP-SGD with this ε budget (at --dp-hospitals, or every hospital).")] = None,
    dp_hospitals: Annotated[str, typer.Option(help="Hospitals (from 0, comma-separated) that train with DP-SGD; default all.")] = "",
    dp_delta: float = _P.dp_delta,
    dp_lr: Annotated[float, typer.Option(help="Local learning rate of hospitals under DP-SGD.")] = _F.dp_lr,
    secure_aggregation: Annotated[bool, typer.Option(help="Masked aggregation: the server sees only the sum.")] = False,
    poison: Annotated[str, typer.Option(help="TESTING ONLY. KIND:K, hospital K sends poisoned adaptors; KIND scale|flip|nan.")] = "",
    adaptor_kind: AdaptorKindOpt = _F.adaptor_kind, lora_preset: LoraPresetOpt = "pefomed",
    lora_rank: LoraRankOpt = None, lora_alpha: LoraAlphaOpt = None, lora_dropout: LoraDropoutOpt = None,
    lora_targets: LoraTargetsOpt = None, lora_towers: LoraTowersOpt = _F.lora_towers,
    continual: ContinualOpt = _F.continual, lwf_weight: LwfWeightOpt = _F.lwf_weight,
) -> None:
    """Simulate a federation of phantom hospitals with Flower (the main job); re-running resumes it."""
    from deploy.report import headline
    from deploy.simulate import SimulationInterrupted, run_simulation, simulation_config, trainable_hospitals

    plan = SimulationPlan(hospitals, images_per_hospital, image_size, dp_epsilon, dp_delta,
                          _hospital_list(dp_hospitals), poison)  # --poison is checked first thing in the run
    default_min = trainable_hospitals(hospitals, scenario, stages) - bool(poison)
    config = simulation_config(out, hospitals, min_hospitals=min_hospitals or default_min,
                               stages=stages, rounds_per_stage=rounds_per_stage, local_epochs=local_epochs, scenario=scenario, strategy=strategy,
                               max_update_norm=max_update_norm, max_weight_ratio=max_weight_ratio,
                               trim_fraction=trim_fraction, byzantine_hospitals=byzantine_hospitals,
                               backbone=backbone, seed=seed, dp_lr=dp_lr, secure_aggregation=secure_aggregation,
                               continual=continual, lwf_weight=lwf_weight,
                               adaptor_kind=adaptor_kind, **lora_fields(lora_settings(
                                   lora_preset, lora_rank, lora_alpha, lora_dropout, lora_targets, lora_towers)))
    console = Console(stderr=True)
    try:
        report = run_simulation(config, plan, console)
    except SimulationInterrupted as exc:
        console.print(f"[yellow]{exc}[/]")
        raise typer.Exit(130) from None
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    adaptors = report["adaptors"]
    console.print(f"trained {adaptors['kind']}: {adaptors['trainable_parameters']:,} parameters, "
                  f"{adaptors['payload_bytes']:,} bytes per hospital per round; continual learning: "
                  f"{report['continual']['method']}")
    figures = headline(report)
    console.print(f"final macro AUROC [bold]{fmt(figures['final_macro_auroc'])}[/] · zero-shot "
                  f"{fmt(figures['zero_shot'])} · centralized {fmt(figures['centralized'])} · forgetting "
                  f"{fmt(figures['forgetting'])} · {report['timing']['seconds_per_round']:.1f} s/round")
    if report["refused"]:
        console.print(f"[yellow]{len(report['refused'])} replies not counted[/] (report.json 'refused'): " + "; ".join(
            f"{r['hospital']} s{r['stage'] + 1}r{r['round'] + 1}: {r['reason']}" for r in report["refused"][:3])
            + (" …" if len(report["refused"]) > 3 else ""))
    if report["poison"]:
        console.print(f"[bold red]{report['poison']['note']}[/]")
    console.print(f"wrote {out}/report.json, {out}/report.html and the checkpoint {report['checkpoint']}")
