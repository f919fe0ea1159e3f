"""``retune phantom``: write a phantom chest X-ray data set (PNGs + manifest.csv) for one hospital."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from shared.errors import RetuneError
from research.phantom import write_phantom


def phantom(
    out: Annotated[Path, typer.Option("--out", help="Folder to write images/, manifest.csv and phantom.json to.")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")],
    hospital: Annotated[int, typer.Option("--hospital", help="Hospital id K: sets scanner style and prevalence.")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Generator seed; same seed, same bytes.")] = 0,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels.")] = 256,
    style_family: Annotated[str, typer.Option("--style-family", help="clinical (modern sites, as retune simulate) or archive (digitised film, as the default backbone's pretraining).")] = "clinical",
) -> None:
    """Write N phantom chest X-rays of hospital K with CheXpert-5 labels (real co-occurrence statistics)."""
    console = Console()
    columns = (TextColumn("[bold]phantom h{task.fields[hospital]}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("phantom", total=n, hospital=hospital)
            manifest = write_phantom(out, n, hospital, seed, size, family=style_family,
                                     progress=lambda k: bar.update(task, completed=k))
    except RetuneError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(code=1) from exc
    done = f"wrote {n} images of hospital {hospital} (seed {seed}, {size} px) to {out}; manifest: {manifest}"
    console.print(done, soft_wrap=True)
