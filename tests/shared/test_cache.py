import numpy as np
import pytest
import torch
from PIL import Image

from shared.cache import EmbeddingCache
from shared.config import EmbedConfig
from shared.data.problems import BadFiles
from shared.errors import RetuneError


def _fp32_embeddings(backbone, paths):
    batch = torch.stack([backbone.preprocess(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        return torch.nn.functional.normalize(backbone.model.encode_image(batch), dim=-1).numpy()


def test_images_are_embedded_once_and_match_fp32(tmp_path, tiny_backbone, png_files):
    cache = EmbeddingCache(tmp_path / "cache", tiny_backbone, EmbedConfig(batch_size=4, shard_size=4))
    emb, ok = cache.images(png_files, BadFiles("fail"), show_progress=False)
    assert ok.all() and emb.shape == (6, tiny_backbone.embed_dim)
    cosine = (emb * _fp32_embeddings(tiny_backbone, png_files)).sum(1)
    assert cosine.min() >= 0.999  # bf16 is used only where it agrees with fp32
    shards = sorted((cache.dir / "images").glob("shard-*.safetensors"))
    assert len(shards) == 2
    again = EmbeddingCache(tmp_path / "cache", tiny_backbone)  # a new process reuses the shards
    emb2, _ = again.images(png_files, BadFiles("fail"), show_progress=False)
    assert np.array_equal(emb, emb2)
    assert sorted((cache.dir / "images").glob("shard-*.safetensors")) == shards  # nothing re-embedded


def test_cache_key_is_image_content_not_path(tmp_path, tiny_backbone, png_files):
    cache = EmbeddingCache(tmp_path / "cache", tiny_backbone)
    copy = tmp_path / "copy.png"
    copy.write_bytes(open(png_files[0], "rb").read())
    emb, _ = cache.images([png_files[0], str(copy)], BadFiles("fail"), show_progress=False)
    assert np.array_equal(emb[0], emb[1])
    assert len(cache.image_store.index) == 1
    assert (emb[0] * _fp32_embeddings(tiny_backbone, png_files[:1])[0]).sum() >= 0.999  # the image's, not zeros


def test_interrupted_run_resumes(tmp_path, tiny_backbone, png_files):
    """A run that stops at a bad file keeps the shards written so far; the rerun embeds only the rest."""
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    refs = png_files[:4] + [str(corrupt)] + png_files[4:]
    config = EmbedConfig(batch_size=2, shard_size=2)
    with pytest.raises(RetuneError, match="corrupt.png"):
        EmbeddingCache(tmp_path / "cache", tiny_backbone, config).images(refs, BadFiles("fail"), False)
    cache = EmbeddingCache(tmp_path / "cache", tiny_backbone, config)
    assert len(cache.image_store.index) == 4  # the work before the stop survived
    bad = BadFiles("skip")
    emb, ok = cache.images(refs, bad, show_progress=False)
    assert ok.tolist() == [True] * 4 + [False] + [True] * 2
    assert [b.ref for b in bad.items] == [str(corrupt)]
    assert len(cache.image_store.index) == 6
    assert np.abs(emb[~ok]).sum() == 0


def test_missing_file_is_reported_not_fatal_under_skip(tmp_path, tiny_backbone, png_files):
    bad = BadFiles("skip")
    _, ok = EmbeddingCache(tmp_path / "c", tiny_backbone).images(png_files[:1] + [str(tmp_path / "nope.png")], bad, False)
    assert ok.tolist() == [True, False] and bad.items[0].reason == "missing"


def test_text_embeddings_are_cached(tmp_path, tiny_backbone, monkeypatch):
    cache = EmbeddingCache(tmp_path / "cache", tiny_backbone)
    texts = ["No evidence of edema", "Findings consistent with edema"]
    first = cache.texts(texts)
    assert torch.allclose(first, tiny_backbone.encode_texts(texts), atol=1e-6)
    shards = list((cache.dir / "texts").glob("*.safetensors"))
    assert torch.equal(cache.texts(texts[::-1]), first.flip(0))
    assert list((cache.dir / "texts").glob("*.safetensors")) == shards
    monkeypatch.setattr(tiny_backbone, "encode_texts", _must_not_embed)  # a new process reads them from disk
    assert torch.equal(EmbeddingCache(tmp_path / "cache", tiny_backbone).texts(texts), first)
    assert list((cache.dir / "texts").glob("*.safetensors")) == shards


def _must_not_embed(texts):
    raise AssertionError(f"re-embedded {texts}: the cached embeddings were not used")


@pytest.mark.parametrize("min_cosine, precision", [(0.999, "bf16"), (2.0, "fp32")])
def test_bf16_is_chosen_on_the_first_images_and_fp32_kept_for_every_image_otherwise(tmp_path, tiny_backbone,
                                                                                    min_cosine, precision):
    """Calibration compares fp32 and bf16 on the first few images only; when bf16 falls short, every image of that
    first batch (not only the calibration ones) and of the later ones is embedded in fp32."""
    from shared.cache import CALIBRATION_IMAGES

    rng = np.random.default_rng(1)
    paths = []
    for i in range(2 * CALIBRATION_IMAGES + 3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(paths[-1])
    config = EmbedConfig(batch_size=CALIBRATION_IMAGES + 4, bf16_min_cosine=min_cosine)
    cache = EmbeddingCache(tmp_path / "cache", tiny_backbone, config)
    emb, ok = cache.images(paths, BadFiles("fail"), show_progress=False)
    assert ok.all() and cache.precision == precision
    reference = _fp32_embeddings(tiny_backbone, paths)
    if precision == "fp32":
        np.testing.assert_allclose(emb, reference, rtol=0, atol=1e-5)
    else:
        cosine = (emb * reference).sum(1)
        assert cosine.min() >= 0.999 and not np.allclose(emb, reference, rtol=0, atol=1e-6)  # bf16, and close
