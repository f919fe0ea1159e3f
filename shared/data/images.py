"""Load chest X-rays from PNG/JPEG, DICOM or MedMNIST ``.npz`` into 8-bit greyscale PIL images.

Image references are strings: a file path, or ``PATH.npz::SPLIT_images::INDEX`` for one image inside a
MedMNIST archive. Every failure is an :class:`ImageError` with a short ``reason`` (``missing``, ``unreadable``,
``empty file``, ``corrupt``, ``unsupported format``, ``empty pixel data``, ``too large``) used to count bad files.

An image of more than ``max_pixels`` pixels (:attr:`shared.config.EmbedConfig.max_pixels`) is ``too large``: its
width and height (and DICOM frames) are read from the header before anything is decoded, so a decompression
bomb (a 20000 x 20000 PNG of a few kB) costs no memory; PIL's own DecompressionBombWarning/Error never escape.

Intensity mapping to 8 bits:

* 8-bit PNG/JPEG are kept as they are; RGB/palette/alpha images are converted with PIL's ITU-R 601 luma.
* 16-bit (and float) PNG/TIFF are windowed to their 0.5-99.5 percentiles, which ignores burnt-in labels
  and dead pixels that a full min-max range would let squash the lungs into a few grey levels.
* DICOM: modality LUT / rescale slope-intercept first; then the VOI LUT sequence, or else the first Window
  Center/Width (LINEAR, LINEAR_EXACT or SIGMOID), or else the percentile window; MONOCHROME1 is inverted
  so bone is bright and air dark, as on a MONOCHROME2 display.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import warnings
from functools import lru_cache

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from shared.config import EmbedConfig
from shared.errors import RetuneError

NPZ_SEP = "::"
PERCENTILES = (0.5, 99.5)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}
_OPEN_LOCK = threading.Lock()  # warnings.catch_warnings is process-wide: one thread at a time inside it


class ImageError(RetuneError):
    """An image that cannot be read; ``reason`` is a short category, ``detail`` the specifics."""

    def __init__(self, ref: str, reason: str, detail: str = "") -> None:
        self.ref, self.reason, self.detail = ref, reason, detail
        suffix = f" ({detail})" if detail else ""
        super().__init__(f"cannot read image {ref}: {reason}{suffix}")


def is_npz_ref(ref: str) -> bool:
    """True for ``PATH.npz::KEY::INDEX`` references."""
    return NPZ_SEP in ref


def load_image(ref: str, max_pixels: int = EmbedConfig.max_pixels) -> Image.Image:
    """Return the image at ``ref`` as an 8-bit greyscale (mode ``L``) PIL image, or raise :class:`ImageError`
    (``too large`` beyond ``max_pixels``, checked before decoding)."""
    if is_npz_ref(ref):
        return _load_npz(ref, max_pixels)
    _check_file(ref)
    head = _read_head(ref)
    if head[128:132] == b"DICM" or os.path.splitext(ref)[1].lower() in {".dcm", ".dicom"}:
        return _load_dicom(ref, max_pixels)
    return _load_pil(ref, max_pixels)


def content_hash(ref: str) -> str:
    """SHA-256 hex digest of the file's bytes (streamed); for npz refs, of the image's array plus the ref."""
    if is_npz_ref(ref):
        arr = _npz_image(ref)
        h = hashlib.sha256(f"{ref}|{arr.dtype.str}|{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()
    _check_file(ref)
    try:
        with open(ref, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise ImageError(ref, "unreadable", e.strerror or str(e)) from e


def to_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linearly map ``[lo, hi]`` to ``[0, 255]``, clipping outside; an empty range thresholds at ``lo``."""
    arr = np.asarray(arr, dtype=np.float64)
    if hi <= lo:
        return np.where(arr > lo, 255, 0).astype(np.uint8)
    return np.round(np.clip((arr - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def percentile_window(arr: np.ndarray) -> tuple[float, float]:
    """The 0.5-99.5 percentile range of ``arr`` (on a subsample of large images, for speed)."""
    step = max(1, int(np.sqrt(arr.size / 1_000_000)))
    sample = arr[::step, ::step] if arr.ndim == 2 else arr
    lo, hi = np.percentile(sample, PERCENTILES)
    if hi <= lo:  # almost constant image: fall back to the full range
        lo, hi = float(arr.min()), float(arr.max())
    return float(lo), float(hi)


def _check_file(ref: str) -> None:
    try:
        st = os.stat(ref)
    except FileNotFoundError as e:
        raise ImageError(ref, "missing", "no such file") from e
    except OSError as e:
        raise ImageError(ref, "unreadable", e.strerror or str(e)) from e
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(ref, "unsupported format", "not a regular file")
    if st.st_size == 0:
        raise ImageError(ref, "empty file", "0 bytes")


def _read_head(ref: str) -> bytes:
    """The first 132 bytes: enough to see DICOM's ``DICM`` magic after its 128-byte preamble."""
    try:
        with open(ref, "rb") as f:
            return f.read(132)
    except OSError as e:
        raise ImageError(ref, "unreadable", e.strerror or str(e)) from e


def _check_pixels(ref: str, width: int, height: int, max_pixels: int, frames: int = 1) -> None:
    if width * height * frames > max_pixels:
        shape = f"{frames} frames of {width} x {height}" if frames > 1 else f"{width} x {height}"
        raise ImageError(ref, "too large", f"{shape} pixels, over the limit of {max_pixels:,} (max_pixels)")


def _open_pil(ref: str) -> Image.Image:
    """``Image.open``, which reads only the header; max_pixels, not PIL's warning, bounds the size."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(ref)


def _load_pil(ref: str, max_pixels: int) -> Image.Image:
    try:
        with _open_pil(ref) as img:
            _check_pixels(ref, *img.size, max_pixels)
            img.load()
            return _pil_to_grey(img)
    except UnidentifiedImageError as e:
        known = os.path.splitext(ref)[1].lower() in _IMAGE_SUFFIXES
        raise ImageError(ref, "corrupt" if known else "unsupported format", "not a PNG, JPEG or DICOM file") from e
    except Image.DecompressionBombError as e:  # beyond PIL's hard limit, before its size reaches us
        limit = f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels, over the limit of {max_pixels:,}"
        raise ImageError(ref, "too large", f"{limit} (max_pixels)") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(ref, "corrupt", str(e)) from e


def _pil_to_grey(img: Image.Image) -> Image.Image:
    if img.mode == "L":
        return img.copy()
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img)
        return Image.fromarray(to_uint8(arr, *percentile_window(arr)))
    return img.convert("RGB").convert("L")  # via RGB so palette, alpha and CMYK modes all work


def _load_dicom(ref: str, max_pixels: int) -> Image.Image:
    try:
        header = pydicom.dcmread(ref, stop_before_pixels=True)
        _check_pixels(ref, int(header.get("Columns") or 0), int(header.get("Rows") or 0), max_pixels,
                      int(header.get("NumberOfFrames") or 1))
        return _decode_dicom(ref, pydicom.dcmread(ref))
    except ImageError:
        raise
    except Exception as e:  # pydicom parses elements lazily: a damaged file can raise almost any type, anywhere
        raise ImageError(ref, "corrupt", f"DICOM unreadable: {type(e).__name__}: {e}") from e


def _decode_dicom(ref: str, ds: pydicom.Dataset) -> Image.Image:
    if "PixelData" not in ds:
        raise ImageError(ref, "empty pixel data", "DICOM has no Pixel Data element")
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError) as e:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        raise ImageError(ref, "unsupported format", f"cannot decode transfer syntax {syntax}: {e}") from e
    if arr.size == 0:
        raise ImageError(ref, "empty pixel data", "DICOM pixel array is empty")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in {"MONOCHROME1", "MONOCHROME2"}:  # colour: let PIL do the luma conversion
        if arr.ndim == 4:
            arr = arr[0]
        return Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("L")
    if arr.ndim == 3:  # multi-frame: first frame
        arr = arr[0]
    try:
        grey = _dicom_window(arr, ds)
    except ValueError as e:
        raise ImageError(ref, "corrupt", f"invalid DICOM VOI/window attributes: {e}") from e
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return Image.fromarray(grey)


def _dicom_window(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Modality LUT, then VOI LUT / window / percentile window, as uint8 (before any MONOCHROME1 inversion)."""
    values = apply_modality_lut(arr, ds)
    if ds.get("VOILUTSequence"):  # LUTs index integers: round a rescaled (float) image first
        out = apply_voi_lut(np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values, ds)
        lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
        return to_uint8(out, float(lut.min()), float(lut.max()))
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = float(_first(ds.WindowCenter)), float(_first(ds.WindowWidth))
        if width <= 0:
            raise ValueError(f"window width {width} must be positive")
        values = values.astype(np.float64)
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        if function == "SIGMOID":
            return to_uint8(1.0 / (1.0 + np.exp(-4.0 * (values - center) / width)), 0.0, 1.0)
        if function == "LINEAR":  # PS3.3 C.11.2.1.2.1; LINEAR_EXACT uses centre and width as given
            center, width = center - 0.5, width - 1.0
        return to_uint8(values, center - width / 2, center + width / 2)
    return to_uint8(values, *percentile_window(values))


def _first(value: object) -> object:
    return value[0] if isinstance(value, (list, tuple, MultiValue)) else value


def _parse_npz_ref(ref: str) -> tuple[str, str, int]:
    parts = ref.split(NPZ_SEP)
    if len(parts) != 3 or not parts[2].strip().lstrip("-").isdigit():
        raise ImageError(ref, "unsupported format", "npz references look like PATH.npz::test_images::12")
    return parts[0], parts[1], int(parts[2])


@lru_cache(maxsize=4)
def _npz_array(path: str, key: str, mtime_ns: int) -> np.ndarray:
    """One array of an npz archive, loaded once per file version (reading a key loads the whole array)."""
    try:
        with np.load(path) as npz:
            if key not in npz.files:
                raise ImageError(f"{path}{NPZ_SEP}{key}", "missing", f"archive has keys {sorted(npz.files)}")
            return npz[key]
    except (OSError, ValueError, EOFError) as e:
        raise ImageError(path, "corrupt", f"unreadable npz archive: {e}") from e


def _npz_image(ref: str) -> np.ndarray:
    path, key, index = _parse_npz_ref(ref)
    _check_file(path)
    arr = _npz_array(os.path.abspath(path), key, os.stat(path).st_mtime_ns)
    if not 0 <= index < len(arr):
        raise ImageError(ref, "missing", f"index {index} outside 0..{len(arr) - 1}")
    return arr[index]


def _load_npz(ref: str, max_pixels: int) -> Image.Image:
    arr = _npz_image(ref)
    if arr.size == 0:
        raise ImageError(ref, "empty pixel data", "empty array")
    if arr.ndim >= 2:
        _check_pixels(ref, arr.shape[1], arr.shape[0], max_pixels)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.dtype == np.uint8:
        return Image.fromarray(arr).convert("L")
    if arr.ndim != 2:
        raise ImageError(ref, "unsupported format", f"expected an HxW or HxWx3 image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return Image.fromarray(arr)
    return Image.fromarray(to_uint8(arr, *percentile_window(arr)))
