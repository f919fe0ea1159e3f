"""``retune simulate``: the researchers' main job, a federation on one machine, of phantom hospitals or of their own
data split into hospitals (``--data``, ``--partition``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from deploy.cli_options import (AdaptorKindOpt, ContinualOpt, DiseasesOpt, FormatOpt, ImageRootOpt, LoraAlphaOpt,
                                LoraDropoutOpt, LoraPresetOpt, LoraRankOpt, LoraTargetsOpt, LoraTowersOpt,
                                LwfWeightOpt, OutsideOpt, UncertainOpt, lora_fields, lora_settings)
from shared.config import STRATEGIES, FederationConfig, SimulationData, SimulationPlan
from shared.errors import RetuneError

_F, _P, _D = FederationConfig(), SimulationPlan(), SimulationData()


def _hospital_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise RetuneError(f"--dp-hospitals {text!r}: expected hospital numbers separated by commas, e.g. 0,2") from None


def simulate(
    out: Annotated[Path, typer.Option(help="Run folder: report.json, report.html, checkpoint/, hospitals/, cache/.")] = Path("runs/simulate"),
    data: Annotated[Optional[Path], typer.Option("--data", help="Your own label file (CheXpert/NIH/MIMIC CSV, ChestMNIST .npz or manifest CSV), split into hospitals by --partition (default: phantom hospitals).")] = None,
    fmt: FormatOpt = _D.format,
    partition: Annotated[str, typer.Option(help="With --data: natural[:COLUMN] (one hospital per value of the 'hospital' column, or COLUMN), iid, dirichlet:ALPHA[:DISEASE] or pathological:K[:DISEASE] (label skew over a disease or the label combination), with --hospitals N. Patient-disjoint; the same --seed, the same hospitals.")] = _D.partition,
    hospital_labels: Annotated[str, typer.Option(help="With --data: what each hospital labels, 'site-a=Edema,Atelectasis;site-b=all' or a TOML file (default: every hospital labels all it has).")] = _D.hospital_labels,
    diseases: DiseasesOpt = None, uncertain: UncertainOpt = _D.uncertain, image_root: ImageRootOpt = None,
    metadata: Annotated[Optional[Path], typer.Option(help="MIMIC-CXR's metadata CSV (mimic-cxr-2.0.0-metadata.csv).")] = None,
    allow_outside_paths: OutsideOpt = _D.allow_outside_paths,
    splits: Annotated[str, typer.Option(help="official (the file's train/val/test, else by patient hash) or hash (every patient 80/10/10 by hash).")] = _D.splits,
    min_train_images: Annotated[int, typer.Option(help="Refuse a partition that leaves a hospital fewer training images.")] = _D.min_train_images,
    hospitals: Annotated[Optional[int], typer.Option(help=f"Phantom hospitals (default {_P.hospitals}), or with --data the hospitals of an iid, dirichlet or pathological partition.")] = None,
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
    dp_hospitals: Annotated[str, typer.Option(help="Hospitals (numbers from 0, in the order of their names as report.json lists them; comma-separated) that train with DP-SGD; default all.")] = "",
    dp_delta: float = _P.dp_delta,
    dp_lr: Annotated[float, typer.Option(help="Local learning rate of hospitals under DP-SGD.")] = _F.dp_lr,
    secure_aggregation: Annotated[bool, typer.Option(help="Masked aggregation: the server sees only the sum.")] = False,
    poison: Annotated[str, typer.Option(help="TESTING ONLY. KIND:K, hospital K sends poisoned adaptors; KIND scale|flip|nan.")] = "",
    adaptor_kind: AdaptorKindOpt = _F.adaptor_kind, lora_preset: LoraPresetOpt = "pefomed",
    lora_rank: LoraRankOpt = None, lora_alpha: LoraAlphaOpt = None, lora_dropout: LoraDropoutOpt = None,
    lora_targets: LoraTargetsOpt = None, lora_towers: LoraTowersOpt = _F.lora_towers,
    continual: ContinualOpt = _F.continual, lwf_weight: LwfWeightOpt = _F.lwf_weight,
) -> None:
    """Simulate a federation with Flower (the main job): phantom hospitals, or your own data split into hospitals
    (--data, --partition); re-running resumes it."""
    from deploy.partition import PartitionSpec
    from deploy.report import headline
    from deploy.sim_data import prepare_data
    from deploy.simulate import (HOSPITALS_DIR, SimulationInterrupted, run_simulation, simulation_config,
                                 trainable_hospitals)
    from research.poison import Poison

    source = SimulationData(str(data or ""), fmt, partition, hospital_labels, diseases or "", uncertain,
                            str(image_root or ""), str(metadata or ""), allow_outside_paths, splits, min_train_images)
    spec = PartitionSpec.parse(partition, hospitals, seed) if data is not None else None  # before anything is read

    def plan_of(count: int) -> SimulationPlan:
        plan = SimulationPlan(count, images_per_hospital, image_size, dp_epsilon, dp_delta,
                              _hospital_list(dp_hospitals), poison, data=source)
        if poison:
            Poison.parse(poison, count)
        return plan

    # the hospitals are counted before the data are read (and --dp-hospitals and --poison checked against them),
    # except in a natural partition, whose column's values are the hospitals
    natural = spec is not None and spec.kind == "natural"
    plan = SimulationPlan(images_per_hospital=images_per_hospital, image_size=image_size, data=source) if natural \
        else plan_of(hospitals or _P.hospitals)
    console = Console(stderr=True, soft_wrap=True)  # a line per figure, unbroken in a log or a pipe
    made = prepare_data(out / HOSPITALS_DIR, plan, seed, console)
    if natural:
        plan = plan_of(len(made.hospitals))
    count = plan.hospitals
    default_min = trainable_hospitals([h.labelled for h in made.hospitals], scenario, stages, made.diseases) \
        - bool(poison)
    own = {"diseases": ",".join(made.diseases)} if data is not None else {}
    config = simulation_config(out, count, min_hospitals=min_hospitals or default_min, **own,
                               stages=stages, rounds_per_stage=rounds_per_stage, local_epochs=local_epochs, scenario=scenario, strategy=strategy,
                               max_update_norm=max_update_norm, max_weight_ratio=max_weight_ratio,
                               trim_fraction=trim_fraction, byzantine_hospitals=byzantine_hospitals,
                               backbone=backbone, seed=seed, dp_lr=dp_lr, secure_aggregation=secure_aggregation,
                               continual=continual, lwf_weight=lwf_weight,
                               adaptor_kind=adaptor_kind, **lora_fields(lora_settings(
                                   lora_preset, lora_rank, lora_alpha, lora_dropout, lora_targets, lora_towers)))
    try:
        report = run_simulation(config, plan, console, data=made)
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
