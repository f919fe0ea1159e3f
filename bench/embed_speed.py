"""Images per second of a backbone through the real embedding path (PNG files -> EmbeddingCache), bf16 vs fp32.

    python bench/embed_speed.py [--backbone retune-minilm-phantom] [--images 600] [--size 128] [--out FILE.json]
    python bench/embed_speed.py --backbone ViT-B-16 --images 96 --size 224   # BiomedCLIP's image tower, random weights

Phantom PNGs of hospital 0 (seed 0) are written to a scratch folder; each precision embeds them into its own fresh
cache, so the time covers what ``retune embed`` does: content hashing, PNG decoding, the open_clip preprocess on
the loader threads, the image tower, and writing the shards. ``bf16`` is the cache's default (bf16 weights where
they agree with fp32 within cosine 0.999, else fp32); ``fp32`` forces full precision. The two runs' embeddings
are compared (minimum cosine). In the same run: a plain open_clip fp32 loop and the bf16 ceiling (see
:func:`reference`), and the path's ratio to each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(backbone_spec: str, images: int, size: int, repeats: int = 2) -> dict:
    import numpy as np
    import torch

    from shared.backbone import load_backbone
    from shared.cache import EmbeddingCache
    from shared.config import EmbedConfig
    from shared.data.problems import BadFiles
    from research.phantom import write_phantom

    with tempfile.TemporaryDirectory(prefix="retune-embed-speed-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_phantom(root / "data", images, hospital=0, seed=0, size=size)
        write_s = time.perf_counter() - start
        refs = sorted(str(p) for p in (root / "data" / "images").glob("*.png"))
        start = time.perf_counter()
        backbone = load_backbone(backbone_spec, device="cpu")
        load_s = time.perf_counter() - start
        result: dict = {"backbone": backbone.describe(), "images": len(refs), "size": size, "load_s": round(load_s, 2),
                        "write_phantoms_s": round(write_s, 2), "threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                        "torch": torch.__version__, "runs": {}}
        outputs = {}
        for label, config in (("bf16", EmbedConfig()), ("fp32", EmbedConfig(bf16_min_cosine=2.0))):
            rates = []
            for r in range(repeats):
                cache = EmbeddingCache(root / f"cache-{label}-{r}", backbone, config)
                start = time.perf_counter()
                emb, ok = cache.images(refs, BadFiles("fail"), show_progress=False)
                rates.append(len(refs) / (time.perf_counter() - start))
                assert ok.all()
            outputs[label] = emb
            result["runs"][label] = {"precision_used": cache.precision, "images_per_s": round(max(rates), 1),
                                     "all_runs_images_per_s": [round(x, 1) for x in rates]}
        result["min_cosine_bf16_vs_fp32"] = float((outputs["bf16"] * outputs["fp32"]).sum(1).min())
        # The image tower alone, on preprocessed batches (no decoding), for reference.
        size_cfg = backbone.model.visual.preprocess_cfg["size"]
        batch = torch.randn(32, 3, *((size_cfg, size_cfg) if isinstance(size_cfg, int) else size_cfg))
        visual = backbone.model.visual
        for label, module, x in (("fp32", visual, batch), ("bf16", __import__("copy").deepcopy(visual).to(torch.bfloat16),
                                                           batch.to(torch.bfloat16))):
            with torch.inference_mode():
                module(x)
                start, n = time.perf_counter(), 0
                while time.perf_counter() - start < 2.0:
                    module(x)
                    n += len(x)
            result["runs"][label]["model_only_images_per_s"] = round(n / (time.perf_counter() - start), 1)
        result["reference"] = reference(backbone, refs, visual, batch[:1])
        bf16_rate = result["runs"]["bf16"]["images_per_s"]
        result["ratios"] = {"bf16_path_vs_plain_fp32_loop": round(bf16_rate / result["reference"]["plain_fp32_loop_images_per_s"], 2),
                            "bf16_path_vs_bf16_ceiling": round(bf16_rate / result["reference"]["bf16_ceiling_images_per_s"], 3)}
        del np
        return result


def reference(backbone, refs: list[str], visual, one, batch_size: int = 32, seconds: float = 2.0) -> dict:
    """What the path is judged against, measured in the same run: a plain open_clip fp32 loop (PIL decode, the
    model's own preprocess, the image tower, one batch at a time, no threads) and the bf16 ceiling (a 2048² bf16
    GEMM's FLOP/s ÷ the image tower's FLOP per image); the fp32 GEMM for the ratio of the two."""
    import torch
    from PIL import Image
    from torch.utils.flop_counter import FlopCounterMode

    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(refs), batch_size):
            x = torch.stack([backbone.preprocess(Image.open(r).convert("RGB")) for r in refs[i:i + batch_size]])
            backbone.model.encode_image(x)
    plain = len(refs) / (time.perf_counter() - start)
    visual.train()  # counted off the fused inference fast path of attention, which the counter does not see
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        visual(one)
    visual.eval()
    flops = counter.get_total_flops()
    gemm = {dtype: _gemm_flops(dtype, seconds) for dtype in (torch.bfloat16, torch.float32)}
    ceiling = gemm[torch.bfloat16] / flops
    return {"plain_fp32_loop_images_per_s": round(plain, 2), "gflop_per_image": round(flops / 1e9, 2),
            "bf16_gemm_tflops": round(gemm[torch.bfloat16] / 1e12, 3),
            "fp32_gemm_tflops": round(gemm[torch.float32] / 1e12, 3),
            "bf16_ceiling_images_per_s": round(ceiling, 1),
            # the most any bf16 path can gain over the plain loop on this machine
            "bf16_ceiling_vs_plain_fp32_loop": round(ceiling / plain, 2)}


def _gemm_flops(dtype, seconds: float) -> float:
    """FLOP/s of a 2048² GEMM in ``dtype`` on this machine's cores."""
    import torch

    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    torch.mm(a, b)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        n += 1
    return n * 2 * 2048 ** 3 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="retune-minilm-phantom")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (default: print only)")
    args = parser.parse_args()
    result = measure(args.backbone, args.images, args.size)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
