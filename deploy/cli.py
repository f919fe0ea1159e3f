"""``retune``: the command line that hospital IT, consortium operators and researchers run."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from deploy.cli_approve import approve
from deploy.cli_ask import ask, vqa_app
from deploy.cli_audit import audit_app
from deploy.cli_backbone import build_backbone
from deploy.cli_certs import certs
from deploy.cli_data import data_app
from deploy.cli_federation import federation_app
from deploy.cli_gateway import gateway
from deploy.cli_hospital import hospital_app
from deploy.cli_keys import keys
from deploy.cli_phantom import phantom
from deploy.cli_redteam import redteam
from deploy.cli_roster import roster
from deploy.cli_server import server_app
from deploy.cli_simulate import simulate
from deploy.cli_options import (AdaptorKindOpt, ContinualOpt, DiseasesOpt, FormatOpt, ImageRootOpt, LoraAlphaOpt,
                                LoraDropoutOpt, LoraPresetOpt, LoraRankOpt, LoraTargetsOpt, LoraTowersOpt,
                                LwfWeightOpt, OutsideOpt, UncertainOpt, lora_settings)
from deploy.drafts import DEFAULT_BANK
from shared.config import (ADAPTOR_KINDS, OFFLINE_DEFAULT, AdaptorConfig, EmbedConfig, FederationConfig, LoraConfig,
                           TrainConfig, continual_method, default_cache_dir)
from shared.errors import RetuneError

#: ``retune --help`` groups the commands by who runs them.
RESEARCHER, HOSPITAL_IT, OPERATOR = "Researchers", "Hospital IT", "Consortium operators"
app = typer.Typer(help="Federated RE-tune fine-tuning of chest X-ray vision-language models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="markdown")
app.command(rich_help_panel=RESEARCHER)(simulate)
app.add_typer(data_app, name="data", rich_help_panel=HOSPITAL_IT)
app.command(rich_help_panel=HOSPITAL_IT)(approve)
app.add_typer(hospital_app, name="hospital", rich_help_panel=HOSPITAL_IT)
app.add_typer(audit_app, name="audit", rich_help_panel=HOSPITAL_IT)
app.command(rich_help_panel=HOSPITAL_IT)(redteam)
app.add_typer(federation_app, name="federation", rich_help_panel=OPERATOR)
app.add_typer(server_app, name="server", rich_help_panel=OPERATOR)
app.command(rich_help_panel=OPERATOR)(keys)
app.command(rich_help_panel=OPERATOR)(certs)
app.command(rich_help_panel=OPERATOR)(roster)
app.command(rich_help_panel=OPERATOR)(gateway)
app.command(rich_help_panel=RESEARCHER, help="Write procedurally generated phantom chest X-rays and their "
            "manifest.csv (offline demo data).")(phantom)
app.command(name="build-backbone", rich_help_panel=RESEARCHER)(build_backbone)
app.add_typer(vqa_app, name="vqa", rich_help_panel=RESEARCHER)
app.command(rich_help_panel=RESEARCHER)(ask)
console = Console(stderr=True)

_T, _A, _F = TrainConfig(), AdaptorConfig(), FederationConfig()
DataOpt = Annotated[Path, typer.Option("--data", help="Label file: CheXpert/NIH/MIMIC CSV, ChestMNIST .npz or manifest CSV.")]
BackboneOpt = Annotated[str, typer.Option(help="biomedclip, hf-hub:ID, a local open_clip directory, or an open_clip name.")]
CacheOpt = Annotated[Path, typer.Option(help="Embedding cache folder (stays on this machine).")]
BadFileOpt = Annotated[str, typer.Option("--on-bad-file", help="skip (report and go on) or fail (stop at the first).")]
PublicKeyOpt = Annotated[Optional[Path], typer.Option(help="consortium.pub: refuse a checkpoint it did not sign.")]
MaxPixelsOpt = Annotated[int, typer.Option(min=1, help="Largest image (width x height) to embed; larger ones are skipped as bad files.")]


def _load_data(data: Path, fmt: str, diseases: str | None, uncertain: str, image_root: Path | None,
               backbone: str, cache: Path, on_bad_file: str, max_pixels: int, allow_outside_paths: bool,
               pixels: bool = False):
    """Read labels, load the backbone and embed every image through the cache (``pixels``: keep the preprocessed
    images too, for LoRA in the image tower)."""
    from client.local_data import embed_splits
    from shared.backbone import cached_backbone
    from shared.cache import EmbeddingCache
    from shared.data.problems import BadFiles, print_bad_files
    from shared.data.readers import read_labels
    from shared.labels import resolve_schema

    table = read_labels(data, format=fmt, diseases=resolve_schema(diseases).diseases if diseases else None,
                        uncertain=uncertain, image_root=image_root, allow_outside_paths=allow_outside_paths)
    bb = cached_backbone(backbone)
    console.print(f"backbone: [bold]{bb.label}[/] (embedding size {bb.embed_dim})")
    store = EmbeddingCache(cache, bb, EmbedConfig(max_pixels=max_pixels))
    bad = BadFiles(on_bad_file)  # type: ignore[arg-type]
    start = time.perf_counter()
    splits = embed_splits(table, store, bad, pixels=pixels)
    embed_s = time.perf_counter() - start
    print_bad_files(bad, console)
    return table, bb, store, splits, bad, embed_s


def _auroc_table(title: str, metrics: dict) -> Table:
    table = Table(title=title)
    for column in ("disease", "zero-shot AUROC", "adaptors AUROC"):
        table.add_column(column, justify="right" if "AUROC" in column else "left")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for disease, value in metrics["per_class_auroc"].items():
        table.add_row(disease, fmt(metrics["zero_shot"]["per_class_auroc"][disease]), fmt(value))
    table.add_row("[bold]macro", fmt(metrics["zero_shot"]["macro_auroc"]), f"[bold]{fmt(metrics['macro_auroc'])}")
    return table


@app.command(rich_help_panel=RESEARCHER)
def embed(data: DataOpt, cache: CacheOpt = default_cache_dir(), backbone: BackboneOpt = OFFLINE_DEFAULT,
          fmt: FormatOpt = "auto", image_root: ImageRootOpt = None, on_bad_file: BadFileOpt = "skip",
          max_pixels: MaxPixelsOpt = EmbedConfig.max_pixels, allow_outside_paths: OutsideOpt = False) -> None:
    """Embed every image of a data set once with the frozen backbone; later commands reuse the cache."""
    _, bb, store, splits, bad, embed_s = _load_data(data, fmt, None, "ignore", image_root, backbone, cache, on_bad_file,
                                                    max_pixels, allow_outside_paths)
    summary = {"cache": str(store.dir), "backbone": bb.describe(), "precision": store.precision,
               "images": {name: len(split.labels) for name, split in splits.items()},
               "bad_files": bad.summary(), "embed_s": round(embed_s, 2)}
    print(json.dumps(summary, indent=2))


@app.command(rich_help_panel=RESEARCHER)
def train(
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Output folder: metrics.json, metrics.png, adaptors.safetensors + .json.")],
    backbone: BackboneOpt = OFFLINE_DEFAULT,
    scenario: Annotated[str, typer.Option(help="joint|class|label|data")] = "joint",
    tasks: Annotated[Optional[int], typer.Option(help="Number of tasks (default: 5 data chunks; one disease per class/label task).")] = None,
    epochs: int = _T.epochs, batch_size: int = _T.batch_size, lr: float = _T.lr, seed: int = _T.seed,
    adaptor: Annotated[str, typer.Option(help="mlp|linear|residual")] = _A.kind,
    adaptor_kind: AdaptorKindOpt = "retune", lora_preset: LoraPresetOpt = "pefomed",
    lora_rank: LoraRankOpt = None, lora_alpha: LoraAlphaOpt = None, lora_dropout: LoraDropoutOpt = None,
    lora_targets: LoraTargetsOpt = None, lora_towers: LoraTowersOpt = ",".join(LoraConfig.towers),
    continual: ContinualOpt = _F.continual, lwf_weight: LwfWeightOpt = _F.lwf_weight,
    cache: CacheOpt = default_cache_dir(), fmt: FormatOpt = "auto", diseases: DiseasesOpt = None,
    uncertain: UncertainOpt = "ignore", image_root: ImageRootOpt = None, on_bad_file: BadFileOpt = "skip",
    max_pixels: MaxPixelsOpt = EmbedConfig.max_pixels, allow_outside_paths: OutsideOpt = False,
) -> None:
    """Train RE-tune adaptors (or LoRA in the backbone, --adaptor-kind) centrally and score them against zero-shot."""
    from client.centralized import train_centralized
    from client.local_data import prompt_embeddings, require_rows
    from deploy.plots import plot_training
    from shared.checkpoint import save_checkpoint
    from shared.prompts import PromptBank

    method = continual_method(continual, scenario)
    if adaptor_kind not in ADAPTOR_KINDS:
        raise RetuneError(f"unknown --adaptor-kind {adaptor_kind!r}: choose {', '.join(ADAPTOR_KINDS)}")
    lora = None if adaptor_kind == "retune" else lora_settings(lora_preset, lora_rank, lora_alpha, lora_dropout,
                                                               lora_targets, lora_towers)
    table, bb, store, splits, bad, embed_s = _load_data(data, fmt, diseases, uncertain, image_root, backbone,
                                                        cache, on_bad_file, max_pixels, allow_outside_paths,
                                                        pixels=lora is not None and "image" in lora.towers)
    require_rows(splits, "train", "test")
    bank = PromptBank(table.diseases)
    prompts = prompt_embeddings(store, bank, tokens=lora is not None and "text" in lora.towers)
    train_config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    adaptor_config = AdaptorConfig(kind=adaptor)  # type: ignore[arg-type]
    with console.status(f"training adaptors ({scenario})"):
        run = train_centralized(splits["train"], splits["test"], prompts, table.diseases,
                                scenario=scenario, train_config=train_config,  # type: ignore[arg-type]
                                adaptor_config=adaptor_config, n_tasks=tasks, device=bb.device, kind=adaptor_kind,
                                lora=lora, clip=bb.model, continual=method, lwf_weight=lwf_weight)
    metrics = {**run.metrics, "backbone": bb.describe(), "embed_s": embed_s, "embed_precision": store.precision,
               "train_config": {f.name: getattr(train_config, f.name) for f in fields(train_config)},
               "data": {"source": str(data), "format": table.format, "diseases": list(table.diseases),
                        "images": {k: len(v.labels) for k, v in splits.items()}, "bad_files": bad.summary()}}
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, run.model, bank, bb.describe())
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_training(metrics, out / "metrics.png")
    console.print(_auroc_table(f"{scenario} training on {len(splits['train'].labels)} images", metrics))
    console.print(f"embedding {embed_s:.1f} s, training {run.metrics['train_s']:.1f} s; wrote {out}/metrics.json, "
                  f"metrics.png and the adaptors checkpoint")


@app.command(rich_help_panel=RESEARCHER)
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="Folder holding adaptors.safetensors and adaptors.json.")],
    data: DataOpt, split: Annotated[str, typer.Option(help="train|val|test|all")] = "test",
    cache: CacheOpt = default_cache_dir(), fmt: FormatOpt = "auto", uncertain: UncertainOpt = "ignore",
    image_root: ImageRootOpt = None, on_bad_file: BadFileOpt = "skip", public_key: PublicKeyOpt = None,
    max_pixels: MaxPixelsOpt = EmbedConfig.max_pixels, allow_outside_paths: OutsideOpt = False,
) -> None:
    """Score a checkpoint on a data set; prints the same metrics as ``retune train``."""
    from client.centralized import zero_shot_metrics
    from client.incremental import Split
    from client.local_data import prompt_embeddings, require_rows
    from client.trainer import predict_logits
    from deploy.inference import check_backbone, open_checkpoint
    from shared.metrics import classification_metrics

    model, bank, sidecar = open_checkpoint(checkpoint, public_key, console)
    _, bb, store, splits, _, _ = _load_data(data, fmt, ",".join(bank.diseases), uncertain, image_root,
                                            sidecar["backbone"]["spec"], cache, on_bad_file, max_pixels,
                                            allow_outside_paths, pixels=model.image_tower is not None)
    check_backbone(bb.identity, sidecar)
    if split == "all":
        import numpy as np
        parts = list(splits.values())
        splits["all"] = Split(np.concatenate([s.embeddings for s in parts]), np.concatenate([s.labels for s in parts]),
                              None if model.image_tower is None else np.concatenate([s.pixels for s in parts]))
    require_rows(splits, split)
    prompts = prompt_embeddings(store, bank, tokens=model.text_tower is not None)
    part = splits[split]
    metrics = classification_metrics(predict_logits(model, part.inputs(model), prompts), part.labels, bank.diseases)
    metrics["zero_shot"] = zero_shot_metrics(part, prompts, bank.diseases)
    console.print(_auroc_table(f"{checkpoint} on {split} ({len(part.labels)} images)", metrics))
    print(json.dumps(metrics, indent=2))


@app.command(rich_help_panel=RESEARCHER)
def predict(
    images: Annotated[list[Path], typer.Argument(help="PNG/JPEG/DICOM files.")],
    checkpoint: Annotated[Path, typer.Option(help="Folder holding adaptors.safetensors and adaptors.json.")],
    cache: CacheOpt = default_cache_dir(), public_key: PublicKeyOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    report: Annotated[bool, typer.Option("--report", help="Also draft a FINDINGS/IMPRESSION report per image by "
                                         "retrieval from a sentence bank (not for clinical use).")] = False,
    bank: Annotated[str, typer.Option(help="Sentence bank for --report: auto (iu where torchxrayvision is "
                                      "installed, else phantom), phantom (the offline default backbone's own "
                                      "phrasing) or iu (Indiana University reports, CC BY-NC-ND 4.0: "
                                      "non-commercial use only; needs torchxrayvision).")] = DEFAULT_BANK,
) -> None:
    """Per-disease probabilities for each image (and, with --report, a drafted report)."""
    from deploy.inference import score_images

    if report:  # a wrong --bank fails before any image is scored
        from deploy.drafts import choose_bank

        bank, why = choose_bank(bank)
        console.print(f"report bank: {bank} ({why})", soft_wrap=True)
    scored = score_images(checkpoint, images, cache, public_key, console)
    diseases, probs, ok = scored.bank.diseases, scored.probabilities, scored.ok
    result = {str(p): dict(zip(diseases, map(float, row))) if good else None
              for p, row, good in zip(images, probs, ok)}
    drafts = {}
    if report:
        from deploy.drafts import draft_reports, load_bank

        with console.status(f"reading the {bank} sentence bank"):
            sentences = load_bank(bank)
        drafts = dict(zip(result, draft_reports(scored, sentences, console=console)))
        console.print(f"report sentences: {sentences.source['title']}; licence: {sentences.source['licence']}",
                      soft_wrap=True)
    if as_json:
        if report:
            print(json.dumps({"bank": sentences.describe(), "images": {
                path: None if row is None else {"probabilities": row, "report": drafts[path].to_dict()}  # type: ignore[union-attr]
                for path, row in result.items()}}, indent=2))
        else:
            print(json.dumps(result, indent=2))
        return
    table = Table(title=f"probabilities ({scored.backbone_label})")
    table.add_column("image")
    for disease in diseases:
        table.add_column(disease, justify="right")
    for path, row in result.items():
        table.add_row(path, *(["unreadable"] + [""] * (len(diseases) - 1) if row is None
                              else [f"{p:.2f}" for p in row.values()]))
    out = Console()
    out.print(table)
    for path, draft in drafts.items():
        if draft is not None:
            out.print(f"[bold]{escape(path)}[/]\n{escape(draft.text)}\n", soft_wrap=True)


def main() -> None:
    """Console entry point: user errors print one clear line and exit 2; bugs keep their traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    try:
        app()
    except RetuneError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)
