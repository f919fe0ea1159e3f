"""The bad-file policy: stop at the first unreadable image (``fail``) or skip it and count it (``skip``).

Nothing is ever skipped silently: every skipped file is kept in :attr:`BadFiles.items`, summarised by reason,
and :func:`print_bad_files` shows the summary on stderr.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, get_args

from PIL import Image
from rich.console import Console
from rich.markup import escape

from shared.config import EmbedConfig
from shared.data.images import ImageError, load_image
from shared.errors import RetuneError

Policy = Literal["skip", "fail"]


@dataclass(frozen=True)
class BadFile:
    """One file that could not be used."""

    ref: str
    reason: str
    detail: str = ""


@dataclass
class BadFiles:
    """Collects bad files; in ``fail`` mode the first one raises a :class:`RetuneError`."""

    policy: Policy = "fail"
    items: list[BadFile] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in get_args(Policy):
            raise RetuneError(f"unknown bad-file policy {self.policy!r}: use 'skip' or 'fail'")

    def record(self, ref: str, reason: str, detail: str = "") -> None:
        """Note a bad file; raise at once under the ``fail`` policy."""
        self.items.append(BadFile(ref, reason, detail))
        if self.policy == "fail":
            suffix = f" ({detail})" if detail else ""
            raise RetuneError(
                f"bad image file {ref}: {reason}{suffix}. Fix or remove it, or pass --on-bad-file skip "
                "to leave bad files out (they are counted and reported)."
            )

    def load(self, ref: str, max_pixels: int = EmbedConfig.max_pixels) -> Image.Image | None:
        """:func:`load_image`, recording (and under ``skip`` returning None for) an unreadable file."""
        try:
            return load_image(ref, max_pixels)
        except ImageError as e:
            self.record(ref, e.reason, e.detail)
            return None

    def __len__(self) -> int:
        return len(self.items)

    def counts(self) -> dict[str, int]:
        """Number of bad files per reason, most frequent first."""
        return dict(Counter(item.reason for item in self.items).most_common())

    def summary(self, examples: int = 10) -> dict:
        """JSON-able summary: total, count per reason and the first ``examples`` bad files."""
        return {
            "count": len(self.items),
            "by_reason": self.counts(),
            "examples": [{"image": b.ref, "reason": b.reason, "detail": b.detail} for b in self.items[:examples]],
        }


def print_bad_files(bad: BadFiles, console: Console | None = None, examples: int = 3) -> None:
    """Print a short summary of skipped files to stderr (nothing when there are none)."""
    if not bad.items:
        return
    console = console or Console(stderr=True)
    reasons = ", ".join(f"{n} {reason}" for reason, n in bad.counts().items())
    console.print(f"[yellow]skipped {len(bad)} bad image file(s):[/] {escape(reasons)}")
    for item in bad.items[:examples]:
        detail = f" ({item.detail})" if item.detail else ""
        console.print(f"  {escape(item.ref)}: {escape(item.reason + detail)}", soft_wrap=True)
    if len(bad) > examples:
        console.print(f"  ... and {len(bad) - examples} more")
