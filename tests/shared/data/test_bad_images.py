"""Hostile image files: decompression bombs, damaged PNG/JPEG/DICOM, empty and missing files, palette and 16-bit
PNGs. Each is an ImageError with a reason (counted and reported), never another exception or a warning."""

from __future__ import annotations

import inspect
import resource
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.cache import EmbeddingCache
from shared.config import EmbedConfig
from shared.data.images import ImageError, load_image
from shared.data.problems import BadFiles
from tests.shared.data.hostile import huge_png, write_dicom


def _reason(ref: str, max_pixels: int = EmbedConfig.max_pixels) -> str:
    with pytest.raises(ImageError) as err:
        load_image(ref, max_pixels)
    return err.value.reason


def test_a_20000_px_png_bomb_is_too_large_and_never_decoded(tmp_path):
    bomb = huge_png(tmp_path / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 100_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not escape either
        bad = BadFiles("skip")
        assert bad.load(str(bomb)) is None
    assert [(b.reason, b.detail) for b in bad.items] == [
        ("too large", "more than 178,956,970 pixels, over the limit of 40,000,000 (max_pixels)")]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # kB: nothing was decoded


def test_a_png_over_max_pixels_is_refused_from_its_header(tmp_path):
    big = huge_png(tmp_path / "big.png", 12000, 12000)  # 144 Mpx in 18 kB: PIL itself only warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError) as err:
            load_image(str(big))
    assert err.value.reason == "too large"
    assert str(err.value) == (f"cannot read image {big}: too large (12000 x 12000 pixels, over the limit of "
                              "40,000,000 (max_pixels))")


def test_max_pixels_is_configurable_and_defaults_to_embed_config(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(path)
    assert _reason(str(path), max_pixels=9_999) == "too large"
    assert load_image(str(path), max_pixels=10_000).size == (100, 100)
    assert inspect.signature(load_image).parameters["max_pixels"].default == EmbedConfig().max_pixels
    np.savez(tmp_path / "m.npz", test_images=np.zeros((1, 28, 28), np.uint8))
    assert _reason(f"{tmp_path}/m.npz::test_images::0", max_pixels=700) == "too large"


def test_dicom_size_comes_from_the_header_before_the_pixels(tmp_path):
    liar = write_dicom(tmp_path, np.zeros((4, 4)), "liar.dcm", Rows=20000, Columns=20000)  # 32 bytes of pixels
    with pytest.raises(ImageError, match=r"too large \(20000 x 20000 pixels"):
        load_image(liar)
    frames = write_dicom(tmp_path, np.zeros((2, 4, 4)), "frames.dcm", NumberOfFrames=2)
    with pytest.raises(ImageError, match=r"too large \(2 frames of 4 x 4 pixels, over the limit of 20 "):
        load_image(frames, max_pixels=20)
    assert load_image(frames, max_pixels=32).size == (4, 4)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def test_damaged_empty_and_missing_files_have_a_reason(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "ok.png")
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "ok.jpg", quality=90)
    png, jpg = (tmp_path / "ok.png").read_bytes(), (tmp_path / "ok.jpg").read_bytes()
    dicom = Path(write_dicom(tmp_path, rng.integers(0, 4096, (16, 16)))).read_bytes()
    meta_vr = dicom.index(b"\x02\x00\x10\x00UI") + 4  # the transfer syntax's VR in the file meta
    files = {
        "cut.jpg": (jpg[: len(jpg) // 2], "corrupt"),
        "flipped.png": (_flip(png, len(png) // 2), "corrupt"),  # a bad CRC in the image data
        "cut.dcm": (dicom[:-7], "corrupt"),
        "bad-vr.dcm": (dicom[:meta_vr] + b"Uk" + dicom[meta_vr + 2:], "corrupt"),  # pydicom: NotImplementedError
        "empty.png": (b"", "empty file"),
        "empty.dcm": (b"", "empty file"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    found = {name: _reason(str(tmp_path / name)) for name in files}
    assert found == {name: reason for name, (_, reason) in files.items()}
    assert _reason(str(tmp_path / "gone.dcm")) == "missing"


def test_palette_png_goes_through_its_palette(tmp_path):
    index = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    img = Image.fromarray(index, mode="P")
    img.putpalette([v for i in range(256) for v in (255 - i,) * 3])  # index i is grey 255 - i
    img.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert np.array_equal(np.asarray(load_image(str(tmp_path / "p.png"))), 255 - index)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 512).astype(np.uint16), (8, 1))  # 12-bit detector values in 16 bits
    Image.fromarray(ramp).save(tmp_path / "a16.png")
    assert Image.open(tmp_path / "a16.png").mode == "I;16"
    out = np.asarray(load_image(str(tmp_path / "a16.png"))).astype(int)[0]
    assert out[0] == 0 and out[-1] == 255 and np.all(np.diff(out) >= 0)
    assert abs(out[256] - 128) <= 3  # mid-range is mid-grey: clipping to 8 bits would make it 255
    assert len(np.unique(out)) > 200  # and the grey levels are used, not squashed


def test_the_cache_skips_and_reports_what_it_cannot_embed(tmp_path, tiny_backbone, png_files):
    bomb = str(huge_png(tmp_path / "bomb.png", 20000, 20000))
    refs = [png_files[0], bomb, str(tmp_path / "gone.png"), png_files[1]]
    bad = BadFiles("skip")
    _, ok = EmbeddingCache(tmp_path / "cache", tiny_backbone).images(refs, bad, show_progress=False)
    assert ok.tolist() == [True, False, False, True]
    assert bad.counts() == {"too large": 1, "missing": 1}
    strict = BadFiles("skip")
    small = EmbeddingCache(tmp_path / "cache2", tiny_backbone, EmbedConfig(max_pixels=80 * 80 - 1))
    assert not small.images(png_files[2:4], strict, show_progress=False)[1].any()
    assert strict.counts() == {"too large": 2}
