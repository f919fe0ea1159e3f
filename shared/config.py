"""Configuration dataclasses: the one place where defaults live. CLI flags and run configs map onto these."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from shared.errors import RetuneError

AdaptorInit = Literal["random", "identity"]
AdaptorKind = Literal["mlp", "linear", "residual"]
Scenario = Literal["joint", "class", "label", "data"]
UncertainPolicy = Literal["ignore", "ones", "zeros"]

#: What a hospital trains: RE-tune's adaptors on the frozen embeddings (``retune``), LoRA inside the frozen
#: backbone's towers (``lora``), or both (see :mod:`shared.lora`).
AdaptorFamily = Literal["retune", "lora", "both"]
ADAPTOR_KINDS: tuple[str, ...] = AdaptorFamily.__args__  # type: ignore[attr-defined]
LORA_TOWERS = ("image", "text")
#: Continual-learning options (see :mod:`shared.continual`): ``auto`` picks :data:`DEFAULT_CONTINUAL` by scenario.
CONTINUAL_METHODS = ("auto", "none", "lwf", "replay")
#: What ``auto`` means per scenario (measured in BENCHMARKS.md).
DEFAULT_CONTINUAL: dict[str, str] = {"class": "replay", "label": "replay", "data": "none", "joint": "none"}

#: The offline default backbone: a small CLIP on the real MiniLM text tower, aligned on phantom chest X-rays.
OFFLINE_DEFAULT = "retune-minilm-phantom"


@dataclass(frozen=True)
class AdaptorConfig:
    """Shape of the image and text adaptors.

    Parameters
    ----------
    kind : {"mlp", "linear", "residual"}
        ``mlp``: Linear(d, h·d) → ReLU → Linear(h·d, d) as in RE-tune (default); ``linear``: one Linear(d, d);
        ``residual``: ``alpha·mlp(x) + (1 − alpha)·x``, which starts close to the frozen embedding.
    hidden_mult : int
        Hidden width as a multiple of the embedding size (default 2).
    residual_alpha : float
        Mix of the residual adaptor (default 0.5).
    logit_scale : float
        Fixed scale on cos(img, pos) − cos(img, neg) before the sigmoid (default 10.0; RE-tune used 1.0).
    init : {"identity", "random"}
        ``identity`` (default): both adaptors start as the identity map (the ReLU MLP as relu(x) − relu(−x), which
        needs ``hidden_mult >= 2``), so training starts from the frozen backbone's zero-shot scores and DP noise
        perturbs a good model rather than a random one; ``random``: PyTorch's default initialisation, seeded.
    """

    kind: AdaptorKind = "mlp"
    hidden_mult: int = 2
    residual_alpha: float = 0.5
    logit_scale: float = 10.0
    init: AdaptorInit = "identity"


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adaptation (peft LoRA) of the frozen backbone's attention; the defaults are PeFoMed's
    (:data:`LORA_PRESETS` ``pefomed``).

    Parameters
    ----------
    rank : int
        Rank r of each update B·A (default 64).
    alpha : float
        Scale: the update is (alpha / r)·B·A (default 16).
    dropout : float
        Dropout on the LoRA branch's input while training (default 0.05).
    targets : tuple[str, ...]
        Attention projections adapted (default ``("q_proj", "v_proj")``, query and value; ``k_proj`` is the
        third allowed). A tower without such modules uses its own names for them (``query``/``value`` in BERT, the
        fused ``qkv`` of a timm ViT, a whole ``MultiheadAttention``); nothing else is ever adapted (see
        :func:`shared.lora.resolve_targets`).
    towers : tuple[str, ...]
        Towers adapted: ``image`` (default) and/or ``text``. An adapted tower cannot use the embedding cache.
    """

    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    towers: tuple[str, ...] = ("image",)

    def __post_init__(self) -> None:
        problems = [why for bad, why in (
            (self.rank < 1, "lora-rank must be at least 1"),
            (self.alpha <= 0, "lora-alpha must be positive"),
            (not 0 <= self.dropout < 1, "lora-dropout must be in [0, 1)"),
            (not self.targets, "lora-targets names no module"),
            (not self.towers or any(t not in LORA_TOWERS for t in self.towers),
             f"lora-towers {','.join(self.towers)!r}: choose one or both of {', '.join(LORA_TOWERS)}"),
        ) if bad]
        if problems:
            raise RetuneError("; ".join(problems))


#: Named LoRA settings: PeFoMed's (r 64, alpha 16, dropout 0.05, query and value projections) is the default.
LORA_PRESETS: dict[str, LoraConfig] = {"pefomed": LoraConfig()}


@dataclass(frozen=True)
class TrainConfig:
    """Local training of the adaptors on cached embeddings.

    Parameters
    ----------
    epochs : int
        Passes over the task's data (default 20).
    batch_size : int
        Samples per step (default 256).
    lr : float
        Adam learning rate (default 1e-3).
    weight_decay : float
        Adam weight decay (default 0.0).
    seed : int
        Seed of shuffling and initialisation (default 0).
    """

    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class EmbedConfig:
    """Embedding images with the frozen backbone.

    Parameters
    ----------
    batch_size : int
        Images per forward pass (default 32).
    shard_size : int
        Embeddings per cache shard; an interrupted run loses at most one shard (default 512).
    bf16_min_cosine : float
        Use bf16 weights on the CPU only where embeddings stay within this cosine of fp32 (default 0.999).
    loader_threads : int
        Threads decoding and preprocessing images while the model runs (default 2).
    max_pixels : int
        Largest image (width × height, read from the header before decoding) a hospital embeds (default 40 million:
        a 6000 × 6000 radiograph); a larger one is skipped and reported like any unreadable file.
    """

    batch_size: int = 32
    shard_size: int = 512
    bf16_min_cosine: float = 0.999
    loader_threads: int = 2
    max_pixels: int = 40_000_000


@dataclass(frozen=True)
class SimulationData:
    """Where ``retune simulate`` takes its hospitals from: phantoms (no ``path``) or a researcher's label file,
    partitioned patient by patient (see :mod:`deploy.partition`).

    Parameters
    ----------
    path : str
        Label file (any format ``retune data check`` reads; default "": phantom hospitals).
    format : str
        ``auto`` or one of chexpert, nih, mimic, chestmnist, manifest (default "auto").
    partition : str
        ``natural[:COLUMN]``, ``iid``, ``dirichlet:ALPHA[:DISEASE]`` or ``pathological:K[:DISEASE]`` (default
        "natural": one hospital per value of the ``hospital`` column).
    hospital_labels : str
        What each hospital labels: ``'site-a=Edema,Atelectasis;site-b=all'`` or a TOML file (default "": every
        hospital labels all it has; phantom hospitals leave one disease unlabelled from the third on).
    diseases : str
        Schema or comma-separated diseases (default "": the format's own).
    uncertain : str
        Uncertain (-1) labels: ignore, ones or zeros (default "ignore").
    image_root : str
        Folder image paths are relative to (default "": the label file's).
    metadata : str
        MIMIC-CXR's metadata CSV (default "").
    allow_outside_paths : bool
        Accept image paths that lead outside the image root (default False).
    splits : str
        ``official`` (the file's train/val/test where it has them, else by patient hash) or ``hash`` (every patient
        by hash, 80/10/10) (default "official").
    min_train_images : int
        The fewest training images a hospital may have (default 20).
    """

    path: str = ""
    format: str = "auto"
    partition: str = "natural"
    hospital_labels: str = ""
    diseases: str = ""
    uncertain: str = "ignore"
    image_root: str = ""
    metadata: str = ""
    allow_outside_paths: bool = False
    splits: str = "official"
    min_train_images: int = 20


@dataclass(frozen=True)
class SimulationPlan:
    """What ``retune simulate`` generates besides the federation settings.

    Parameters
    ----------
    hospitals : int
        Simulated hospitals, each with its own scanner style, prevalence skew and labelled diseases (default 5).
    images_per_hospital : int
        Phantom images per hospital, split 70/10/20 train/val/test (default 600).
    image_size : int
        Phantom image size in pixels (default 128).
    dp_epsilon : float | None
        Turn on DP-SGD with this ε budget over the run (default: off).
    dp_delta : float
        δ of the DP guarantee (default 1e-5).
    dp_hospitals : tuple[int, ...]
        The hospitals (numbers from 0) that train with DP-SGD when ``dp_epsilon`` is set (default (): every one).
    poison : str
        Testing only: ``KIND:K``, hospital K sends poisoned adaptors (see :mod:`research.poison`; default: none).
    cache_dir : str
        Where the simulated hospitals keep their embeddings (default "": ``cache/`` in the run folder); benchmarks
        share one across runs.
    data : SimulationData
        Where the hospitals come from (default: phantoms, ``hospitals`` of them).
    """

    hospitals: int = 5
    images_per_hospital: int = 600
    image_size: int = 128
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_hospitals: tuple[int, ...] = ()
    poison: str = ""
    cache_dir: str = ""
    data: SimulationData = SimulationData()

    def __post_init__(self) -> None:
        if self.hospitals < 2:
            raise RetuneError("a federation needs at least 2 hospitals (--hospitals)")
        if self.dp_hospitals and self.dp_epsilon is None:
            raise RetuneError("--dp-hospitals names where DP-SGD runs: give its budget with --dp-epsilon too")
        outside = sorted(k for k in self.dp_hospitals if not 0 <= k < self.hospitals)
        if outside:
            raise RetuneError(f"--dp-hospitals: no hospital {outside[0]} among {self.hospitals} "
                              f"(0 to {self.hospitals - 1})")

    def dp_at(self, hospital: int) -> bool:
        """Whether simulated hospital ``hospital`` trains with DP-SGD."""
        return self.dp_epsilon is not None and (not self.dp_hospitals or hospital in self.dp_hospitals)


def _coerce(default, value):
    """A run-config value as the type of its default (``"false"`` is False, not True)."""
    if isinstance(default, bool) and isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return type(default)(value)


def continual_method(option: str, scenario: str) -> str:
    """The method a ``continual`` option means for ``scenario`` (``auto``: :data:`DEFAULT_CONTINUAL`)."""
    if option not in CONTINUAL_METHODS:
        raise RetuneError(f"unknown continual {option!r}: choose {', '.join(CONTINUAL_METHODS)}")
    return DEFAULT_CONTINUAL.get(scenario, "none") if option == "auto" else option


def split_names(text: str) -> tuple[str, ...]:
    """``"a, b"`` → ``("a", "b")``."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def default_cache_dir() -> Path:
    """Where embeddings are cached unless ``--cache`` says otherwise: ``$RETUNE_CACHE`` or ``~/.cache/retune-fl``."""
    return Path(os.environ.get("RETUNE_CACHE", "~/.cache/retune-fl")).expanduser()


StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"]
STRATEGIES: tuple[str, ...] = StrategyName.__args__  # type: ignore[attr-defined]
#: Strategies that aggregate each hospital's update separately (robust to Byzantine hospitals); secure aggregation,
#: which shows the server only the sum, cannot feed them.
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
#: Robust strategies built for an assumed number of Byzantine hospitals (``byzantine_hospitals``).
BYZANTINE_STRATEGIES = ("krum", "multikrum", "bulyan")
SCENARIOS: tuple[str, ...] = Scenario.__args__  # type: ignore[attr-defined]
#: Dtypes the adaptor arrays may cross the wire in (both ends compute in float32, see :mod:`shared.wire`).
WIRE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class FederationConfig:
    """One federated run: the Flower run config (``[tool.flwr.app.config]``) maps onto these fields.

    Run-config keys are the field names with dashes (``rounds-per-stage``).

    Parameters
    ----------
    stages : int
        Data-incremental stages; at each stage every hospital trains on its newly arrived data (default 2; with
        ``continual`` ``replay``, on its earlier stages' data too).
    rounds_per_stage : int
        Federated rounds per stage (default 3).
    local_epochs : int
        Local epochs per round (default 2).
    scenario : {"data", "class", "label"}
        What a stage brings: new data (all diseases), new diseases, or new supervision (default "data").
    strategy : {"fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"}
        Aggregation, FedAvg weighted by examples by default; the last five are Flower's Byzantine-robust rules.
    proximal_mu : float
        FedProx proximal weight (default 0.01).
    server_lr : float
        FedAdam server learning rate ``eta`` (default 0.01).
    max_update_norm : float
        A train reply whose update (its adaptors − the global ones) has a norm above this × max(1, the global
        adaptors' norm) is refused (default 5.0; 0: no bound).
    max_weight_ratio : float
        The example count one hospital may claim, as a multiple of the round's median claim (default 10.0; 0: no cap).
    trim_fraction : float
        ``fedtrimmedavg``: fraction cut off each tail of every coordinate (default 0.2, in [0, 0.5)).
    byzantine_hospitals : int
        ``krum``, ``multikrum``, ``bulyan``: hospitals assumed Byzantine (default -1: each round, the most the rule
        withstands among the n replies it aggregates, ⌊(n − 3)/2⌋ for Krum, ⌊(n − 3)/4⌋ for Bulyan). A fixed number
        needs ``min_hospitals`` ≥ 2f + 3 (Bulyan: 4f + 3).
    min_hospitals : int
        Hospitals whose train replies a round needs to count (default 2).
    round_timeout : float
        Seconds the server waits for replies in a round (default 600).
    join_timeout : float
        Seconds a round waits for ``min_hospitals`` to be connected before the run fails (default 600).
    round_retries : int
        Times a round that fewer than ``min_hospitals`` completed is run again before the run fails (default 2).
    backbone : str
        The backbone the hospitals embed with, as the server records it in the checkpoint (default: the offline
        default). Each hospital's own node config decides what it loads; the server compares their identities.
    embed_dim : int
        The backbone's embedding size (default 0: read from the backbone's configuration, without its weights).
    backbone_identity : str
        Identity (64 hex) every hospital's backbone must have (default "": the one most hospitals report first).
    diseases : str
        Label schema or comma-separated diseases (default "chexpert5").
    adaptor : {"mlp", "linear", "residual"}
        Adaptor kind (default "mlp").
    lr, batch_size : float, int
        Local Adam learning rate and batch size (defaults as :class:`TrainConfig`).
    dp_lr : float
        Local learning rate of hospitals that train with DP-SGD (default 0.02): Adam's step on noisy gradients
        moves signal coordinates by about lr × signal/noise, so fewer, noisier steps need a larger rate.
    seed : int
        Seed of adaptor initialisation, stage splits and local shuffling (default 0).
    run_dir : str
        Server folder for the persisted round state and checkpoints (default "runs/federation").
    sim_dir : str
        Simulation only: folder with ``hospital-K/`` sites, chosen by a SuperNode's ``partition-id``.
    secure_aggregation : bool
        Masked aggregation: the server learns only the sum of the hospitals' updates (default False).
    wire_dtype : str
        Dtype of the adaptor arrays on the wire, both ways: ``float16`` (default; half the bytes of ``float32``,
        decoded to float32 before training and aggregation) or ``float32``.
    adaptor_kind : {"retune", "lora", "both"}
        What the hospitals train and the server aggregates (default "retune"; see :data:`ADAPTOR_KINDS`).
    lora_rank, lora_alpha, lora_dropout : int, float, float
        LoRA settings (defaults as :class:`LoraConfig`), used when ``adaptor_kind`` is ``lora`` or ``both``.
    lora_targets, lora_towers : str
        Comma-separated :attr:`LoraConfig.targets` and :attr:`LoraConfig.towers`.
    continual : {"auto", "none", "lwf", "replay"}
        How a stage keeps what earlier stages taught (default "auto": :data:`DEFAULT_CONTINUAL` of the scenario).
        ``lwf``: learning without forgetting, the diseases earlier stages supervised and this one does not are
        distilled from the global model on the stage's own images; ``replay``: each hospital also trains on its
        own earlier stages' images with their labels, and distils as ``lwf`` (:mod:`shared.continual`).
    lwf_weight : float
        Weight of a distilled old-disease score against a real label, for ``lwf`` and ``replay`` (default 2.0;
        1, 2 and 4 measured in BENCHMARKS.md).
    """

    stages: int = 2
    rounds_per_stage: int = 3
    local_epochs: int = 2
    scenario: Scenario = "data"
    strategy: StrategyName = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    max_update_norm: float = 5.0
    max_weight_ratio: float = 10.0
    trim_fraction: float = 0.2
    byzantine_hospitals: int = -1
    min_hospitals: int = 2
    round_timeout: float = 600.0
    join_timeout: float = 600.0
    round_retries: int = 2
    backbone: str = OFFLINE_DEFAULT
    embed_dim: int = 0
    backbone_identity: str = ""
    diseases: str = "chexpert5"
    adaptor: AdaptorKind = "mlp"
    lr: float = TrainConfig.lr
    batch_size: int = TrainConfig.batch_size
    dp_lr: float = 0.02
    seed: int = 0
    run_dir: str = "runs/federation"
    sim_dir: str = ""
    secure_aggregation: bool = False
    wire_dtype: str = "float16"
    adaptor_kind: AdaptorFamily = "retune"
    lora_rank: int = LoraConfig.rank
    lora_alpha: float = LoraConfig.alpha
    lora_dropout: float = LoraConfig.dropout
    lora_targets: str = ",".join(LoraConfig.targets)
    lora_towers: str = ",".join(LoraConfig.towers)
    continual: str = "auto"
    lwf_weight: float = 2.0

    def __post_init__(self) -> None:
        problems = [why for bad, why in (
            (self.strategy not in STRATEGIES, f"unknown strategy {self.strategy!r}: choose {', '.join(STRATEGIES)}"),
            (self.scenario not in SCENARIOS, f"unknown scenario {self.scenario!r}: choose {', '.join(SCENARIOS)}"),
            (self.wire_dtype not in WIRE_DTYPES,
             f"unknown wire-dtype {self.wire_dtype!r}: choose {', '.join(WIRE_DTYPES)}"),
            (self.lwf_weight < 0, "lwf-weight must be at least 0"),
            (self.adaptor_kind not in ADAPTOR_KINDS,
             f"unknown adaptor-kind {self.adaptor_kind!r}: choose {', '.join(ADAPTOR_KINDS)}"),
            (self.scenario == "joint" and self.stages != 1,
             f"the joint scenario trains on everything at once: it has 1 stage, not {self.stages} (stages = 1)"),
            (self.stages < 1 or self.rounds_per_stage < 1 or self.local_epochs < 1,
             "stages, rounds-per-stage and local-epochs must be at least 1"),
            (self.min_hospitals < 1, "min-hospitals must be at least 1"),
            (self.max_update_norm < 0, "max-update-norm must be positive (0: no bound)"),
            (self.max_weight_ratio != 0 and self.max_weight_ratio < 1,
             "max-weight-ratio must be at least 1 (0: no cap)"),
            (not 0 <= self.trim_fraction < 0.5, "trim-fraction must be in [0, 0.5)"),
            (self.byzantine_hospitals < -1, "byzantine-hospitals must be -1 (automatic) or at least 0"),
            (self.strategy in BYZANTINE_STRATEGIES and self.byzantine_hospitals > self.tolerable_byzantine(),
             f"{self.strategy} with min-hospitals {self.min_hospitals} tolerates at most "
             f"{self.tolerable_byzantine()} Byzantine hospitals, not {self.byzantine_hospitals}: raise min-hospitals "
             f"to {self._replies_needed(self.byzantine_hospitals)} or lower byzantine-hospitals"),
            (self.secure_aggregation and self.strategy in ROBUST_STRATEGIES,
             f"{self.strategy} needs each hospital's update, which secure aggregation hides from the server: "
             "choose fedavg, fedprox or fedadam with it"),
        ) if bad]
        if problems:
            raise RetuneError("; ".join(problems))
        self.lora_config()  # refuses bad LoRA settings up front
        continual_method(self.continual, self.scenario)  # and an unknown continual option

    @property
    def continual_method(self) -> str:
        """The continual-learning method this run uses (``continual``, with ``auto`` resolved by scenario)."""
        return continual_method(self.continual, self.scenario)

    def lora_config(self) -> LoraConfig | None:
        """The LoRA settings, or None for ``adaptor_kind = "retune"``."""
        if self.adaptor_kind == "retune":
            return None
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=split_names(self.lora_targets), towers=split_names(self.lora_towers))

    def _replies_needed(self, byzantine: int) -> int:
        return 4 * byzantine + 3 if self.strategy == "bulyan" else 2 * byzantine + 3

    def tolerable_byzantine(self) -> int:
        """The most Byzantine hospitals Krum, MultiKrum or Bulyan tolerates with ``min_hospitals`` replies."""
        return max(0, (self.min_hospitals - 3) // (4 if self.strategy == "bulyan" else 2))

    @classmethod
    def from_run_config(cls, run_config: dict) -> FederationConfig:
        """Build from a Flower run config; unknown keys are an error (a typo must not pass silently)."""
        names = {f.name for f in fields(cls)}
        values = {key.replace("-", "_"): value for key, value in run_config.items()}
        unknown = sorted(set(values) - names)
        if unknown:
            raise RetuneError(f"unknown run-config keys {unknown}; known: {sorted(n.replace('_', '-') for n in names)}")
        typed = {f.name: _coerce(getattr(cls(), f.name), values[f.name]) for f in fields(cls) if f.name in values}
        return cls(**typed)

    def to_run_config(self) -> dict:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


#: Run-config keys that say how the server waits, not what is computed: a run resumed with other values is the
#: same run.
OPERATIONAL_KEYS = ("round-timeout", "join-timeout", "round-retries")


def run_identity(run_config: dict) -> str:
    """What identifies a run across Flower runs (a resumption is a new Flower run): sha256 of its run config as
    :class:`FederationConfig` reads it, without :data:`OPERATIONAL_KEYS`. The server signs it into every round;
    hospitals key their ε charges by it."""
    values = FederationConfig.from_run_config(run_config).to_run_config()
    canonical = json.dumps({k: v for k, v in values.items() if k not in OPERATIONAL_KEYS}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
