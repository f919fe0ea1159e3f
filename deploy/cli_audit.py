"""``retune audit``: check a hospital's hash-chained audit log (mounted by ``deploy.cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

audit_app = typer.Typer(help="The hospital's audit log of everything that left it.", no_args_is_help=True)


@audit_app.callback()
def _audit() -> None:
    """The hospital's audit log of everything that left it."""


@audit_app.command()
def verify(
    log: Annotated[Path, typer.Argument(help="The audit log (the SuperNode's node config `audit-log`).")],
    head: Annotated[Optional[str], typer.Option(help="The head hash a previous verify printed: also detects "
                                                     "entries cut off the end.")] = None,
) -> None:
    """Check the hash chain: exit 0 and one OK line, or exit 1 naming the first bad line."""
    from client.audit import verify_log

    report = verify_log(log, head=head)
    if report.ok:
        typer.echo(f"OK {log}: {report.entries} entries, chain intact, head {report.head}")
        return
    typer.echo(f"BAD {log} line {report.bad_line}: {report.problem} "
               f"({report.entries} entries before it verify)", err=True)
    raise typer.Exit(1)
