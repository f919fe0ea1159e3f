"""Label schemas: which diseases a model scores, in which order.

A schema is a name plus an ordered tuple of disease names. Adding a disease to a model is adding a prompt pair,
never adding parameters, so a schema can grow between tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import RetuneError

CHEXPERT5: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

#: CheXpert's 14 observations (also MIMIC-CXR-JPG's label columns), in the CSV column order.
CHEXPERT14: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)

#: NIH ChestX-ray14's 14 findings, in MedMNIST ChestMNIST's label-column order.
NIH14: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)

SCHEMAS: dict[str, tuple[str, ...]] = {"chexpert5": CHEXPERT5, "chexpert14": CHEXPERT14, "nih14": NIH14}


@dataclass(frozen=True)
class LabelSchema:
    """An ordered list of diseases the model scores."""

    name: str
    diseases: tuple[str, ...]

    def index(self, disease: str) -> int:
        return self.diseases.index(disease)

    def __len__(self) -> int:
        return len(self.diseases)


def resolve_schema(spec: str | list[str] | tuple[str, ...]) -> LabelSchema:
    """Resolve ``chexpert5`` / ``nih14`` / ``chexpert14`` or a comma-separated (or list) custom disease list."""
    if isinstance(spec, (list, tuple)):
        diseases = tuple(d.strip() for d in spec if d.strip())
        name = "custom"
    elif spec.lower() in SCHEMAS:
        return LabelSchema(spec.lower(), SCHEMAS[spec.lower()])
    else:
        diseases = tuple(d.strip() for d in spec.split(",") if d.strip())
        name = "custom"
    if not diseases:
        raise RetuneError(f"empty label schema {spec!r}: name one of {sorted(SCHEMAS)} or list diseases, comma-separated")
    if len(set(diseases)) != len(diseases):
        raise RetuneError(f"label schema {spec!r} names a disease twice")
    return LabelSchema(name, diseases)
