"""``retune data``: inspect label files and images before spending time on training."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from shared.config import EmbedConfig
from shared.errors import RetuneError

data_app = typer.Typer(help="Inspect label files and images before training.", no_args_is_help=True)


class Format(str, Enum):
    auto = "auto"
    chexpert = "chexpert"
    nih = "nih"
    mimic = "mimic"
    chestmnist = "chestmnist"
    manifest = "manifest"


class UncertainPolicy(str, Enum):
    ignore = "ignore"
    ones = "ones"
    zeros = "zeros"


@data_app.callback()
def _data() -> None:
    """Inspect label files and images before training."""


@data_app.command("check")
def check(
    path: Annotated[Path, typer.Argument(help="Label file: CheXpert/NIH/MIMIC CSV (.csv or .csv.gz), ChestMNIST "
                                              ".npz or manifest CSV.")],
    format: Annotated[Format, typer.Option("--format", help="Label file format.")] = Format.auto,
    diseases: Annotated[Optional[str], typer.Option(help="Schema (chexpert5, nih14, chexpert14) or comma-separated "
                                                         "diseases (default: the format's own).")] = None,
    image_root: Annotated[Optional[Path], typer.Option(help="Folder image paths are relative to "
                                                            "(default: the label file's).")] = None,
    uncertain: Annotated[UncertainPolicy, typer.Option(help="Uncertain (-1) labels.")] = UncertainPolicy.ignore,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Decode every image (slow) or only check "
                                                                      "that it exists.")] = True,
    max_pixels: Annotated[int, typer.Option(min=1, help="Largest image (width x height) to accept; larger ones "
                                                        "count as bad files.")] = EmbedConfig.max_pixels,
    allow_outside_paths: Annotated[bool, typer.Option(help="Accept image paths that lead outside the image root "
                                                           "(absolute paths, '..', symlinks).")] = False,
) -> None:
    """Count rows, found/missing/corrupt images, splits and labels per disease; print them as JSON."""
    from shared.data.check import check_dataset

    console = Console(stderr=True)
    try:
        summary = check_dataset(path, format=format.value, diseases=diseases, image_root=image_root,
                                verify_images=verify, uncertain=uncertain.value,  # type: ignore[arg-type]
                                max_pixels=max_pixels, allow_outside_paths=allow_outside_paths)
    except RetuneError as e:
        console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2) from e
    for warning in summary["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    typer.echo(json.dumps(summary, indent=2))
