"""What ``retune build-backbone`` builds: :class:`BuildConfig` (one source of defaults) and the open_clip model and
preprocess configuration it writes into the artifact. Light: no torch import, so the CLI starts fast."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from shared.artifact import MINILM_ID
from research.pretrain.reports import ReportConfig

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
    style_family : str
        Style family of the pretraining hospitals (:data:`research.phantom.STYLE_FAMILIES`; default ``archive``:
        digitised film, unlike the ``clinical`` sites ``retune simulate`` generates).
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
    described_mentions, generic_mentions : float
        Share of findings described by appearance without their label's name, and of named present findings
        stated plainly, in reports and in the sentence bank (see :class:`ReportConfig`; defaults 0.6 and 0.0).
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
    style_family: str = "archive"
    val_images: int = 800
    render_size: int = 128
    image_size: int = 64
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05
    sentence_weight: float = 1.0
    sentence_balance: float = 1.0
    described_mentions: float = ReportConfig.described
    generic_mentions: float = ReportConfig.generic
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

    def report_config(self) -> ReportConfig:
        return ReportConfig(described=self.described_mentions, generic=self.generic_mentions)

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



def with_overrides(config: BuildConfig, **overrides: Any) -> BuildConfig:
    """``config`` with the given fields replaced (None values ignored)."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
