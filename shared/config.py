"""Configuration dataclasses: the one place where defaults live. CLI flags and run configs map onto these."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

AdaptorKind = Literal["mlp", "linear", "residual"]
Scenario = Literal["joint", "class", "label", "data"]
UncertainPolicy = Literal["ignore", "ones", "zeros"]


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
    """

    kind: AdaptorKind = "mlp"
    hidden_mult: int = 2
    residual_alpha: float = 0.5
    logit_scale: float = 10.0


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
    """

    batch_size: int = 32
    shard_size: int = 512
    bf16_min_cosine: float = 0.999
    loader_threads: int = 2


def default_cache_dir() -> Path:
    """Where embeddings are cached unless ``--cache`` says otherwise: ``$RETUNE_CACHE`` or ``~/.cache/retune-fl``."""
    return Path(os.environ.get("RETUNE_CACHE", "~/.cache/retune-fl")).expanduser()
