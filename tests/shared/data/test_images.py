"""load_image / content_hash on real formats: PNG 8/16-bit, JPEG, RGB, real and synthetic DICOM, npz refs."""

from __future__ import annotations

import hashlib

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from shared.data.images import ImageError, content_hash, load_image
from shared.errors import RetuneError
from tests.shared.data.hostile import write_dicom

RAMP = np.tile(np.arange(256, dtype=np.uint8), (16, 1))  # 16 x 256, columns 0..255


def test_png_8bit_is_exact(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(RAMP).save(path)
    img = load_image(str(path))
    assert img.mode == "L" and img.size == (256, 16)
    assert np.array_equal(np.asarray(img), RAMP)


def test_png_16bit_is_windowed_to_8bit(tmp_path):
    arr = np.tile(np.linspace(1000, 5000, 400).astype(np.uint16), (20, 1))
    arr[0, 0] = 65535  # a dead pixel must not squash the window
    path = tmp_path / "a16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")  # really 16-bit on disk
    out = np.asarray(load_image(str(path))).astype(int)
    assert out.dtype == np.int64 and out.min() == 0 and out.max() == 255
    row = out[5]
    assert np.all(np.diff(row) >= 0)  # monotone
    assert 100 < row[200] < 155  # mid-ramp lands mid-grey: the outlier did not set the window


def test_jpeg_and_rgb_to_grey(tmp_path):
    jpg = tmp_path / "a.jpg"
    Image.fromarray(RAMP).save(jpg, quality=95)
    out = np.asarray(load_image(str(jpg))).astype(int)
    assert load_image(str(jpg)).mode == "L"
    assert np.abs(out - RAMP).max() <= 8

    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red -> ITU-R 601 luma 0.299 * 255 = 76
    path = tmp_path / "red.png"
    Image.fromarray(rgb).save(path)
    img = load_image(str(path))
    assert img.mode == "L" and np.all(np.asarray(img) == 76)
    Image.fromarray(rgb).save(tmp_path / "red.jpg")
    assert abs(int(np.asarray(load_image(str(tmp_path / "red.jpg"))).mean()) - 76) <= 3


def test_real_dicom_monochrome1_is_inverted():
    path = get_testdata_file("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array.astype(float)
    img = load_image(path)
    out = np.asarray(img).astype(float)
    assert img.mode == "L" and out.shape == raw.shape
    # MONOCHROME1: high stored values are dark, so the display is anti-correlated with the raw values
    assert np.corrcoef(raw[::8, ::8].ravel(), out[::8, ::8].ravel())[0, 1] < -0.95
    # air-filled lungs come out darker than the mediastinum between them (bone and soft tissue bright)
    left_lung, mediastinum, right_lung = out[320:800, 320:640], out[320:1000, 800:960], out[320:800, 1160:1480]
    assert left_lung.mean() + 40 < mediastinum.mean()
    assert right_lung.mean() + 40 < mediastinum.mean()


def test_synthetic_dicom_rescale_and_window(tmp_path):
    stored = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (4, 1))  # 4 x 100, 0..990
    # values = 2 * stored - 1000 -> -1000..980; window 0 +- 200 (LINEAR: centre - 0.5, width - 1)
    path = write_dicom(tmp_path, stored, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=400)
    out = np.asarray(load_image(path)).astype(int)[0]
    values = 2 * stored[0].astype(float) - 1000
    expected = np.round(np.clip((values - (-0.5 - 199.5)) / 399.0, 0, 1) * 255)
    assert np.array_equal(out, expected)
    assert out[values <= -200].max() == 0 and out[values >= 200].min() == 255

    inverted = write_dicom(tmp_path, stored, "mono1.dcm", RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0,
                      WindowWidth=400, PhotometricInterpretation="MONOCHROME1")
    assert np.array_equal(np.asarray(load_image(inverted)).astype(int)[0], 255 - expected)

    sigmoid = write_dicom(tmp_path, stored, "sigmoid.dcm", RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0,
                     WindowWidth=400, VOILUTFunction="SIGMOID")
    out = np.asarray(load_image(sigmoid)).astype(int)[0]
    assert np.array_equal(out, np.round(255 / (1 + np.exp(-4 * values / 400))))


def test_dicom_without_window_uses_percentiles_and_voi_lut(tmp_path):
    stored = np.tile(np.arange(0, 4000, 4, dtype=np.uint16), (8, 1))
    out = np.asarray(load_image(write_dicom(tmp_path, stored))).astype(int)
    assert out.min() == 0 and out.max() == 255 and np.all(np.diff(out[0]) >= 0)

    lut_item = pydicom.Dataset()
    lut_item.LUTDescriptor = [4096, 0, 16]
    lut_item.add_new(0x00283006, "US", [4095 - i for i in range(4096)])  # LUT Data: decreasing, inverts the ramp
    path = write_dicom(tmp_path, stored, "lut.dcm", VOILUTSequence=pydicom.Sequence([lut_item]))
    lut_out = np.asarray(load_image(path)).astype(int)
    assert np.array_equal(lut_out[0], np.round((4095 - stored[0]) / 4095 * 255))


@pytest.mark.parametrize("name,content,reason", [
    ("garbage.png", b"this is not a png at all" * 10, "corrupt"),
    ("garbage.dcm", b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff", "empty pixel data"),
    ("cut.dcm", open(get_testdata_file("RG1_UNCR.dcm"), "rb").read()[:100_000], "corrupt"),
    ("notes.txt", b"hello world, not an image", "unsupported format"),
    ("empty.jpg", b"", "empty file"),
])
def test_bad_files_raise_image_error(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError) as err:
        load_image(str(path))
    assert err.value.reason == reason and str(path) in str(err.value)
    assert isinstance(err.value, RetuneError)


def test_truncated_png_missing_file_and_no_pixel_data(tmp_path):
    full = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:2000])
    with pytest.raises(ImageError, match="corrupt"):
        load_image(str(cut))
    with pytest.raises(ImageError) as err:
        load_image(str(tmp_path / "nope.png"))
    assert err.value.reason == "missing"
    with pytest.raises(ImageError, match="unsupported format \\(not a regular file\\)"):
        load_image(str(tmp_path))  # e.g. a MIMIC study folder

    path = write_dicom(tmp_path, np.zeros((4, 4)), "nopix.dcm")
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert err.value.reason == "empty pixel data"


def test_npz_refs(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    path = tmp_path / "chestmnist.npz"
    np.savez_compressed(path, test_images=images, test_labels=np.zeros((3, 14), dtype=np.uint8))
    img = load_image(f"{path}::test_images::1")
    assert img.mode == "L" and np.array_equal(np.asarray(img), images[1])
    cases = [(f"{path}::test_images::3", "missing"), (f"{path}::val_images::0", "missing"),
             (f"{path}::test_images", "unsupported format"), (f"{tmp_path}/x.npz::test_images::0", "missing")]
    for ref, reason in cases:
        with pytest.raises(ImageError) as err:
            load_image(ref)
        assert err.value.reason == reason, ref


def test_content_hash(tmp_path, png_files):
    data = open(png_files[0], "rb").read()
    assert content_hash(png_files[0]) == hashlib.sha256(data).hexdigest()
    copy = tmp_path / "copy.png"
    copy.write_bytes(data)
    assert content_hash(str(copy)) == content_hash(png_files[0]) != content_hash(png_files[1])

    npz = tmp_path / "m.npz"
    np.savez(npz, train_images=np.stack([np.zeros((4, 4), np.uint8), np.ones((4, 4), np.uint8)]))
    a, b = content_hash(f"{npz}::train_images::0"), content_hash(f"{npz}::train_images::1")
    assert a != b and a == content_hash(f"{npz}::train_images::0") and len(a) == 64
    with pytest.raises(ImageError, match="missing"):
        content_hash(str(tmp_path / "gone.png"))
