"""The RE-tune prompt bank: positive and negative report-style prompts per disease.

A disease is scored by comparing an image with the mean of its positive prompts and the mean of its negative
prompts. Adding a disease adds a prompt pair, never parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shared.errors import RetuneError

POSITIVE_TEMPLATES: tuple[str, ...] = (
    "Findings consistent with {d}",
    "Findings suggesting {d}",
    "This opacity can represent {d}",
    "Findings are most compatible with {d}",
)
NEGATIVE_TEMPLATES: tuple[str, ...] = (
    "There is no {d}",
    "No evidence of {d}",
    "No evidence of acute {d}",
    "No signs of {d}",
)


def disease_phrase(disease: str) -> str:
    """How a disease name reads inside a sentence: ``Pleural_Thickening`` -> ``pleural thickening``."""
    return disease.replace("_", " ").lower()


@dataclass(frozen=True)
class PromptBank:
    """Positive/negative prompts for an ordered list of diseases.

    Parameters
    ----------
    diseases : tuple[str, ...]
        Diseases in model output order.
    positive, negative : tuple[str, ...]
        Templates with a ``{d}`` placeholder (default: the four RE-tune templates of each polarity).
    overrides : dict[str, dict[str, list[str]]]
        Per-disease literal prompts, ``{"Edema": {"positive": [...], "negative": [...]}}`` (default: none).
    """

    diseases: tuple[str, ...]
    positive: tuple[str, ...] = POSITIVE_TEMPLATES
    negative: tuple[str, ...] = NEGATIVE_TEMPLATES
    overrides: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for template in self.positive + self.negative:
            if "{d}" not in template:
                raise RetuneError(f"prompt template {template!r} has no {{d}} placeholder for the disease name")
        unknown = set(self.overrides) - set(self.diseases)
        if unknown:
            raise RetuneError(f"prompt overrides name diseases outside the schema: {sorted(unknown)}")

    def prompts(self, disease: str) -> dict[str, list[str]]:
        """The positive and negative prompts of one disease."""
        override = self.overrides.get(disease, {})
        phrase = disease_phrase(disease)
        return {
            "positive": list(override.get("positive") or [t.format(d=phrase) for t in self.positive]),
            "negative": list(override.get("negative") or [t.format(d=phrase) for t in self.negative]),
        }

    def texts(self) -> list[str]:
        """Every distinct prompt, in a stable order (what the text encoder embeds)."""
        seen: dict[str, None] = {}
        for disease in self.diseases:
            for polarity in self.prompts(disease).values():
                seen.update(dict.fromkeys(polarity))
        return list(seen)

    def averaging_matrix(self) -> torch.Tensor:
        """A [2C, T] matrix whose row 2c (2c+1) averages disease c's positive (negative) prompts over ``texts()``."""
        index = {text: i for i, text in enumerate(self.texts())}
        matrix = torch.zeros(2 * len(self.diseases), len(index))
        for c, disease in enumerate(self.diseases):
            for p, polarity in enumerate(self.prompts(disease).values()):
                for text in polarity:
                    matrix[2 * c + p, index[text]] += 1.0 / len(polarity)
        return matrix

    def to_dict(self) -> dict[str, dict[str, list[str]]]:
        return {disease: self.prompts(disease) for disease in self.diseases}

    @classmethod
    def from_dict(cls, prompts: dict[str, dict[str, list[str]]]) -> PromptBank:
        """Rebuild a bank from ``to_dict()`` output (every disease as a literal override)."""
        return cls(diseases=tuple(prompts), overrides=prompts)
