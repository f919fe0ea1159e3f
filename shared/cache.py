"""Embedding cache: each image is embedded once per backbone, and every later command reuses it.

Layout under the cache root, one folder per backbone identity (weights hash + preprocessing)::

    ROOT/<identity>/backbone.json           what the embeddings were made with
    ROOT/<identity>/images/shard-*.safetensors   embeddings keyed by image content hash
    ROOT/<identity>/texts/shard-*.safetensors    prompt embeddings keyed by text hash
    ROOT/file-hashes.json                   (path, size, mtime) -> content hash, so re-runs need not re-read

Shards are written atomically every ``shard_size`` embeddings, so an interrupted run resumes where it stopped.
Embeddings are hospital data: the cache stays on the hospital's disk.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from shared.backbone import Backbone
from shared.config import EmbedConfig
from shared.data.images import ImageError, content_hash, load_image
from shared.errors import RetuneError
from shared.data.problems import BadFiles


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def writable(root: Path) -> Iterator[None]:
    """Turn a failure to write the cache at ``root`` (read-only, full, no permission) into one clear error."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).split(":")[-1].strip()
        raise RetuneError(f"cannot write the embedding cache {root}: {why}; free space there, make it writable, or "
                          "choose another folder (--cache, node config cache)") from exc


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` so that readers see the old file or the new one, never half of one."""
    atomic_write_bytes(path, text.encode())


#: Images of the first batch embedded in both fp32 and bf16 to decide whether bf16 weights agree closely enough (an
#: fp32 pass over a whole batch costs as much as two bf16 ones).
CALIBRATION_IMAGES = 8


class ShardStore:
    """Float32 vectors keyed by strings, stored as append-only safetensors shards."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, tuple[Path, int]] = {}
        for shard in sorted(folder.glob("shard-*.safetensors")):
            with safe_open(shard, "pt") as f:
                keys = json.loads(f.metadata()["keys"])
            self.index.update({key: (shard, row) for row, key in enumerate(keys)})

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def put(self, keys: list[str], vectors: torch.Tensor, meta: dict[str, str]) -> None:
        """Write one new shard atomically."""
        if not keys:
            return
        name = f"shard-{time.time_ns():020d}-{os.getpid()}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        try:
            save_file({"embeddings": vectors.float().contiguous()}, tmp, metadata={"keys": json.dumps(keys), **meta})
            os.replace(tmp, self.folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.index.update({key: (self.folder / name, row) for row, key in enumerate(keys)})

    def get(self, keys: list[str]) -> torch.Tensor:
        """Vectors for ``keys`` (all must be present), in order."""
        rows_by_shard: dict[Path, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            shard, row = self.index[key]
            rows_by_shard.setdefault(shard, []).append((i, row))
        out: torch.Tensor | None = None
        for shard, pairs in rows_by_shard.items():
            with safe_open(shard, "pt") as f:
                block = f.get_tensor("embeddings")
            if out is None:
                out = torch.empty(len(keys), block.shape[1])
            where, rows = zip(*pairs)
            out[list(where)] = block[list(rows)]
        return out if out is not None else torch.empty(0, 0)


class EmbeddingCache:
    """Embeds images and prompt texts with a frozen backbone, once, and keeps the result on disk."""

    def __init__(self, root: Path, backbone: Backbone, config: EmbedConfig = EmbedConfig()) -> None:
        self.root = Path(root).expanduser()
        self.backbone = backbone
        self.config = config
        self.dir = self.root / backbone.identity[:32]
        with writable(self.root):
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.dir / "backbone.json", json.dumps(backbone.describe(), indent=2))
            self.image_store = ShardStore(self.dir / "images")
            self.text_store = ShardStore(self.dir / "texts")
        self._hash_file = self.root / "file-hashes.json"
        self._hashes: dict[str, str] = json.loads(self._hash_file.read_text()) if self._hash_file.exists() else {}
        self._fast: torch.nn.Module | None = None
        self.precision = "fp32"

    # -- texts -------------------------------------------------------------------------------------------
    def texts(self, texts: list[str]) -> torch.Tensor:
        """Normalised prompt embeddings [len(texts), d], embedding only the ones not cached yet."""
        keys = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
        missing = [(k, t) for k, t in zip(keys, texts) if k not in self.text_store]
        if missing:
            new_keys, new_texts = zip(*dict(missing).items())
            with writable(self.root):
                self.text_store.put(list(new_keys), self.backbone.encode_texts(list(new_texts)), {})
        return self.text_store.get(keys)

    # -- images ------------------------------------------------------------------------------------------
    def _hash(self, ref: str) -> str:
        try:
            stat = os.stat(ref.split("::")[0])
            memo = f"{ref}|{stat.st_size}|{stat.st_mtime_ns}"
        except OSError:
            return content_hash(ref)  # raises ImageError with the reason
        if memo not in self._hashes:
            self._hashes[memo] = content_hash(ref)
        return self._hashes[memo]

    def _prepare(self, ref: str) -> torch.Tensor:
        return self.backbone.preprocess(load_image(ref, self.config.max_pixels).convert("RGB"))

    @torch.inference_mode()
    def _encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Embed a preprocessed batch; bf16 weights where they agree with fp32 within the configured cosine."""
        visual = self.backbone.model.visual
        batch = batch.to(self.backbone.device)
        if self.precision == "fp32" and self._fast is None:  # calibrate once, on the first few images
            reference = F.normalize(visual(batch[:CALIBRATION_IMAGES]).float(), dim=-1)
            self._fast = copy.deepcopy(visual).to(torch.bfloat16)
            fast = F.normalize(self._fast(batch.to(torch.bfloat16)).float(), dim=-1)
            if float((fast[:CALIBRATION_IMAGES] * reference).sum(-1).min()) >= self.config.bf16_min_cosine:
                self.precision = "bf16"
                return fast.cpu()
            return F.normalize(visual(batch).float(), dim=-1).cpu()
        if self.precision == "bf16":
            return F.normalize(self._fast(batch.to(torch.bfloat16)).float(), dim=-1).cpu()
        return F.normalize(visual(batch).float(), dim=-1).cpu()

    def _batches(self, items: list[tuple[str, str]], pool: ThreadPoolExecutor
                 ) -> Iterator[list[tuple[str, str, Future]]]:
        size = self.config.batch_size
        pending = [(ref, key, pool.submit(self._prepare, ref)) for ref, key in items[:size]]
        for start in range(size, len(items) + size, size):
            nxt = [(ref, key, pool.submit(self._prepare, ref)) for ref, key in items[start:start + size]]
            yield pending
            pending = nxt

    def pixels(self, refs: list[str]) -> np.ndarray:
        """Preprocessed images [N, 3, H, W] (float16) for a tower adapted with LoRA, whose embeddings change as it
        trains and so cannot be cached; ``refs`` must be readable (as :meth:`images` found them)."""
        with ThreadPoolExecutor(self.config.loader_threads) as pool:
            tensors = list(pool.map(self._prepare, refs))
        if not tensors:
            return np.zeros((0, 3, 1, 1), dtype=np.float16)
        return torch.stack(tensors).to(torch.float16).numpy()

    def images(self, refs: list[str], bad: BadFiles, show_progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings [N, d] for ``refs`` and a mask of the ones that could be read (bad ones go to ``bad``)."""
        keys: list[str | None] = []
        for ref in refs:
            try:
                keys.append(self._hash(ref))
            except ImageError as exc:
                bad.record(ref, exc.reason, exc.detail)
                keys.append(None)
        todo = list({k: r for r, k in zip(refs, keys) if k is not None and k not in self.image_store}.items())
        with writable(self.root):
            atomic_write_text(self._hash_file, json.dumps(self._hashes))
            if todo:
                self._embed([(ref, key) for key, ref in todo], bad, show_progress)
        ok = np.array([k is not None and k in self.image_store for k in keys], dtype=bool)
        out = np.zeros((len(refs), self.backbone.embed_dim), dtype=np.float32)
        if ok.any():
            out[ok] = self.image_store.get([k for k in keys if k is not None and k in self.image_store]).numpy()
        return out, ok

    def _embed(self, items: list[tuple[str, str]], bad: BadFiles, show_progress: bool) -> None:
        done_keys: list[str] = []
        done_vecs: list[torch.Tensor] = []

        def flush() -> None:
            if done_keys:
                meta = {"precision": self.precision, "backbone": self.backbone.spec}
                self.image_store.put(list(done_keys), torch.cat(done_vecs), meta)
                done_keys.clear()
                done_vecs.clear()

        columns = (TextColumn("embedding images"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn())
        start = time.perf_counter()
        with Progress(*columns, disable=not show_progress, transient=False, console=Console(stderr=True)) as progress, \
                ThreadPoolExecutor(self.config.loader_threads) as pool:
            task = progress.add_task("embed", total=len(items), rate="-")
            try:
                for batch in self._batches(items, pool):
                    tensors, batch_keys = [], []
                    for ref, key, future in batch:
                        try:
                            tensors.append(future.result())
                            batch_keys.append(key)
                        except ImageError as exc:
                            bad.record(ref, exc.reason, exc.detail)
                    if tensors:
                        done_vecs.append(self._encode(torch.stack(tensors)))
                        done_keys.extend(batch_keys)
                    if len(done_keys) >= self.config.shard_size:
                        flush()
                    progress.advance(task, len(batch))
                    rate = progress.tasks[0].completed / (time.perf_counter() - start)
                    progress.update(task, rate=f"{rate:.1f}")
            finally:
                flush()
