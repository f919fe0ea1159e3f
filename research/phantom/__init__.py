"""Procedural phantom chest X-rays: the project's offline default data.

Real multi-label chest X-ray pixels cannot be had offline, so images are drawn procedurally (anatomy, the five
CheXpert findings as visual patterns, per-hospital scanner style) while their label vectors follow the real
CheXpert co-occurrence statistics. Everything is deterministic in ``(seed, hospital, index)``.

Typical use::

    images, labels = generate(512, hospital=2, seed=0, size=224)   # uint8 [n, s, s], float32 [n, 5]
    manifest = write_phantom("data/h2", 1000, hospital=2)          # PNGs + manifest.csv + phantom.json
"""

from research.phantom.cooccurrence import LABEL_NOISE, JointTable, load_table
from research.phantom.generator import PhantomCase, generate, iter_batches, render_case, sample_case, split_of
from research.phantom.styles import STYLE_FAMILIES, HospitalStyle, StyleFamily, hospital_style
from research.phantom.writer import MANIFEST_COLUMNS, write_phantom

__all__ = [
    "LABEL_NOISE",
    "MANIFEST_COLUMNS",
    "STYLE_FAMILIES",
    "HospitalStyle",
    "JointTable",
    "PhantomCase",
    "StyleFamily",
    "generate",
    "hospital_style",
    "iter_batches",
    "load_table",
    "render_case",
    "sample_case",
    "split_of",
    "write_phantom",
]
