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


@audit_app.command()
def show(
    log: Annotated[Path, typer.Argument(help="The audit log (the SuperNode's node config `audit-log`).")],
    run: Annotated[Optional[int], typer.Option(help="Only this run's entries.")] = None,
    last: Annotated[int, typer.Option(help="Show the last N entries (0: all).")] = 50,
    metrics: Annotated[bool, typer.Option("--metrics", help="Also show the scalar metrics each reply carried, with "
                                                            "their values (an evaluation's released figures).")]
    = False,
) -> None:
    """What left the hospital (or was refused), one line per reply: time, event, run, message, stage/round, the
    records and bytes sent, and why a reply was refused."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from client.audit import AuditLog, verify_log

    report = verify_log(log)
    entries = [e for e in AuditLog(log).entries() if run is None or e.get("run_id") == run]
    shown = entries[-last:] if last else entries
    table = Table(title=f"{log}: {len(shown)} of {len(entries)} entries" + (f" of run {run}" if run else ""))
    for column in ("time (UTC)", "event", "run", "message", "stage.round", "records", "bytes"):
        table.add_column(column, no_wrap=True, justify="right" if column == "bytes" else "left")
    table.add_column("reason", overflow="fold")
    if metrics:
        table.add_column("metrics", overflow="fold")
    for e in shown:
        where = f"{e['stage'] + 1}.{e['round'] + 1}" if "stage" in e and "round" in e else ""
        values = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in sorted(e.get("metric_values", {}).items()))
        cells = [e.get("time", "")[:19].replace("T", " "), e.get("event", ""), str(e.get("run_id", "")),
                 e.get("message_type", ""), where, "+".join(e.get("records", [])), f"{e.get('bytes', 0):,}",
                 e.get("reason", ""), *([values] if metrics else [])]
        table.add_row(*(escape(str(cell)) for cell in cells))
    Console(highlight=False, width=max(160, Console().width)).print(table)
    if not report.ok:
        typer.echo(f"BAD {log} line {report.bad_line}: {report.problem}", err=True)
        raise typer.Exit(1)
