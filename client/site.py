"""A hospital site in a federation: its settings, its embedded data split into stages, and its evaluation.

A SuperNode's ``node_config`` says where the hospital's data are:

- ``manifest``: its label file (any format ``retune data check`` reads);
- ``cache``: its embedding cache folder (default: ``$RETUNE_CACHE`` or ``~/.cache/retune-fl``);
- ``backbone``: the frozen backbone it embeds with (default: the offline default shipped with retune-fl; a staged
  BiomedCLIP folder for production);
- ``diseases``: the diseases it labels, comma-separated (default: every disease of its label file);
- ``name``: the name reports give it (default: the manifest's folder name);
- ``max-pixels``: the largest image it embeds, width × height (default :attr:`EmbedConfig.max_pixels`); larger
  ones are skipped and reported;
- ``allow-outside-paths``: ``true`` lets its label file name images outside the label file's folder (default
  ``false``: such a file is refused);
- ``privacy-ledger``: its ε ledger (default: ``privacy-ledger.json`` beside the manifest; see :mod:`client.privacy`);
- its privacy floor: secure aggregation, adaptor kinds, DP-SGD and evaluation (:mod:`client.floor`).

Every path and the backbone come from the hospital's node config, never from the run config a server sends. In
a simulation the run config's ``sim-dir`` holds ``hospital-K/hospital.json`` with those keys, and the SuperNode's
``partition-id`` K picks one. Images and embeddings never leave the site; what it reports is scalars
(:func:`site_metrics`) and its name and backbone identity.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from client.incremental import Split
from client.local_data import embed_splits, prompt_embeddings, require_rows
from client.floor import PrivacyFloor
from client.node_config import flag, whole
from client.trainer import Prompts, predict_logits
from shared.backbone import cached_backbone
from shared.cache import EmbeddingCache
from shared.config import OFFLINE_DEFAULT, EmbedConfig, FederationConfig, default_cache_dir
from shared.data.names import did_you_mean
from shared.data.problems import BadFiles, print_bad_files
from shared.data.readers import read_labels
from shared.errors import RetuneError
from shared.labels import resolve_schema
from shared.metrics import per_class_auroc
from shared.model import RetuneModel, federation_model
from shared.prompts import PromptBank
from shared.scenarios import Task, make_tasks
from shared.wire import SITE_NAME

SIM_SITE_FILE = "hospital.json"


@dataclass(frozen=True)
class SiteSettings:
    """Where one hospital's data live and what it labels."""

    name: str
    manifest: str
    cache: str
    labelled: tuple[str, ...] | None
    backbone: str = OFFLINE_DEFAULT
    floor: PrivacyFloor = PrivacyFloor()
    ledger: str = ""
    max_pixels: int = EmbedConfig.max_pixels
    allow_outside_paths: bool = False


@dataclass
class Site:
    """A hospital's embedded data aligned to the federation's diseases, and its stage schedule."""

    settings: SiteSettings
    diseases: tuple[str, ...]
    train: Split
    test: Split
    tasks: list[Task]
    prompts: Prompts
    embed_dim: int
    backbone_identity: str


def node_values(config: FederationConfig, node_config: dict) -> dict:
    """A SuperNode's settings: its node config, completed in a simulation by its ``hospital.json``."""
    values = dict(node_config)
    if "manifest" not in values and "partition-id" in values and config.sim_dir:
        path = Path(config.sim_dir) / f"hospital-{int(values['partition-id'])}" / SIM_SITE_FILE
        values = {**json.loads(path.read_text()), **values}
    return values


def site_settings(config: FederationConfig, node_config: dict) -> SiteSettings:
    """Resolve a SuperNode's data settings from its node config (or, in a simulation, its partition)."""
    values = node_values(config, node_config)
    if "manifest" not in values:
        raise RetuneError("this SuperNode has no 'manifest' in its node config: start it with "
                          "--node-config 'manifest=\"/data/labels.csv\" cache=\"/data/cache\"'")
    labelled = values.get("diseases")
    if isinstance(labelled, str):
        labelled = [d.strip() for d in labelled.split(",") if d.strip()]
    name = str(values.get("name", Path(values["manifest"]).parent.name))
    if not SITE_NAME.fullmatch(name):
        raise RetuneError(f"hospital name {name!r} (node config 'name'): use 1-64 letters, digits, '.', '_' or '-'")
    return SiteSettings(
        name=name,
        manifest=str(values["manifest"]),
        cache=str(values.get("cache") or default_cache_dir()),
        labelled=tuple(labelled) if labelled else None,
        backbone=str(values.get("backbone") or OFFLINE_DEFAULT),
        floor=PrivacyFloor.from_node_config(values),
        ledger=str(values.get("privacy-ledger") or Path(values["manifest"]).parent / "privacy-ledger.json"),
        max_pixels=whole(values, "max-pixels", EmbedConfig.max_pixels),
        allow_outside_paths=flag(values, "allow-outside-paths"),
    )


def align_labels(labels: np.ndarray, have: tuple[str, ...], want: tuple[str, ...],
                 labelled: tuple[str, ...] | None) -> np.ndarray:
    """Columns of ``want`` in order; diseases the site does not have or does not label become NaN."""
    out = np.full((len(labels), len(want)), np.nan, dtype=np.float32)
    for c, disease in enumerate(want):
        if disease in have and (labelled is None or disease in labelled):
            out[:, c] = labels[:, have.index(disease)]
    return out


def load_site(config: FederationConfig, settings: SiteSettings) -> Site:
    """Read, embed (through the cache) and split a site's data; memoised while its label file is unchanged, so a
    long-lived hospital runtime keeps it loaded between messages and sees data that arrive later. Any problem
    with the site's data is a RetuneError naming the site."""
    try:
        stat = Path(settings.manifest).stat()
    except OSError as exc:
        raise RetuneError(f"site {settings.name}: cannot read its label file {settings.manifest}: "
                          f"{exc.strerror}") from None
    lora = config.lora_config()
    towers = () if lora is None else lora.towers
    try:
        return _load_site(SiteData(config.diseases, config.scenario, config.stages, config.seed, "image" in towers,
                                   "text" in towers), settings, (stat.st_mtime_ns, stat.st_size))
    except RetuneError as exc:
        raise RetuneError(f"site {settings.name}: {exc}") from exc


@dataclass(frozen=True)
class SiteData:
    """What of a run config shapes a site's loaded data (and nothing else, so that runs differing in anything
    else share one loaded copy)."""

    diseases: str
    scenario: str
    stages: int
    seed: int
    pixels: bool
    tokens: bool


@lru_cache(maxsize=256)  # a simulation keeps every hospital loaded; a deployed runtime has one
def _load_site(data: SiteData, settings: SiteSettings, _stamp: tuple[int, int]) -> Site:
    diseases = resolve_schema(data.diseases).diseases
    table = read_labels(settings.manifest, allow_outside_paths=settings.allow_outside_paths)
    _check_labelled(settings.labelled or (), table.diseases)
    backbone = cached_backbone(settings.backbone)
    cache = EmbeddingCache(Path(settings.cache), backbone, EmbedConfig(max_pixels=settings.max_pixels))
    bad = BadFiles("skip")
    splits = embed_splits(table, cache, bad, show_progress=False, pixels=data.pixels)
    print_bad_files(bad)
    require_rows(splits, "train", "test")
    aligned = {name: Split(split.embeddings, align_labels(split.labels, table.diseases, diseases, settings.labelled),
                           split.pixels) for name, split in splits.items()}
    train, test = aligned["train"], aligned["test"]
    tasks = make_tasks(data.scenario, train.labels, len(test.labels), diseases, data.stages, data.seed)
    prompts = prompt_embeddings(cache, PromptBank(diseases), tokens=data.tokens)
    return Site(settings, diseases, train, test, tasks, prompts,
                backbone.embed_dim, backbone.identity)


def _check_labelled(labelled: tuple[str, ...], have: tuple[str, ...]) -> None:
    """Every disease the node config says the site labels must be a disease of its label file."""
    for disease in labelled:
        if disease not in have:
            raise RetuneError(f"node config 'diseases' names {disease!r}{did_you_mean(disease, have)}, which its "
                              f"label file has no column for; its diseases: {', '.join(have)}")


def site_model(config: FederationConfig, site: Site) -> RetuneModel:
    """An untrained model of the federation's adaptor kind for this site (the global weights go into it)."""
    # retune: no initialisation to throw away, the weights are the message's (LoRA copies real backbone towers)
    with torch.device("meta") if config.adaptor_kind == "retune" else nullcontext():
        return federation_model(config, site.embed_dim, site.settings.backbone)


def stage_test_rows(site: Site, stage: int) -> np.ndarray:
    """Test rows of every stage up to ``stage`` (the test data that has arrived so far)."""
    return np.unique(np.concatenate([task.test_rows for task in site.tasks[:stage + 1]]))


def test_parts(site: Site, stage: int) -> dict[str, np.ndarray]:
    """The test rows a site scores after ``stage``: each stage's (``s<j>``, j ≤ ``stage``) and all of them
    (``all``)."""
    parts = {f"s{j}": site.tasks[j].test_rows for j in range(stage + 1)}
    parts["all"] = stage_test_rows(site, stage)
    return parts


def site_logits(model: RetuneModel, site: Site) -> np.ndarray:
    """The model's logits on the site's test data."""
    return predict_logits(model, site.test.inputs(model), site.prompts)


def site_metrics(model: RetuneModel | None, site: Site, stage: int, logits: np.ndarray | None = None
                 ) -> dict[str, float]:
    """Exact scalars of a site after a stage, as a researcher with the data computes them (the simulation's
    baselines; a hospital releases :func:`client.evaluation.released_metrics` instead): per test part
    (:func:`test_parts`) and disease ``auroc/<part>/<disease>`` with ``pos``/``neg`` counts, so that hospitals can be
    weighted by positive-negative pairs.

    ``logits`` may be given instead of a model (e.g. the zero-shot baseline).
    """
    if logits is None:
        logits = site_logits(model, site)
    parts = test_parts(site, stage)
    metrics: dict[str, float] = {"num-examples": len(parts["all"])}
    for part, rows in parts.items():
        labels = site.test.labels[rows]
        aurocs = per_class_auroc(logits[rows], labels, site.diseases)
        for c, disease in enumerate(site.diseases):
            if aurocs[disease] is None:
                continue
            metrics[f"auroc/{part}/{disease}"] = aurocs[disease]
            metrics[f"pos/{part}/{disease}"] = int(np.sum(labels[:, c] == 1))
            metrics[f"neg/{part}/{disease}"] = int(np.sum(labels[:, c] == 0))
    return metrics
