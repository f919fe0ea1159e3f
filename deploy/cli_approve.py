"""``retune approve``: hospital IT reviews a run's app package (FAB) and approves it by hash."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.errors import RetuneError


def approve(
    list_path: Annotated[Path, typer.Option("--list", help="The hospital's approved-apps JSON (node config "
                                                           "`approved-apps`); created on first approval.")],
    fab: Annotated[Optional[Path], typer.Option(help="The app package to review: a .fab from the operator "
                                                     "(`flwr build`), or one the runtime refused and kept in "
                                                     "pending/ beside the list.")] = None,
    pending: Annotated[bool, typer.Option("--pending", help="List the refused packages kept for review.")] = False,
    installed: Annotated[bool, typer.Option("--installed", help="Show the installed hospital runtime (what runs "
                                                                "here) and its code hash.")] = False,
    note: Annotated[str, typer.Option(help="Why this package is approved (ticket, review).")] = "",
    show: Annotated[bool, typer.Option("--show", help="Only show the package; approve nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Approve without asking (non-interactive).")] = False,
    by: Annotated[Optional[str], typer.Option(help="Who approves (default: the login name).")] = None,
    node_config: Annotated[Optional[str], typer.Option(help="This hospital's node config, as given to "
                                                            "flower-supernode --node-config: the package's default "
                                                            "run config is shown against its privacy floor.")] = None,
) -> None:
    """Show an app package's hash, files, default run config (against the hospital's privacy floor) and what
    changed since the last approval, then approve it. Everything read from the package is shown as text."""
    from client.approval import code_manifest, hospital_code_diff
    from shared.app_packages import PENDING_DIR, AppPackage, add_approval, diff_files, find_approval, read_approved

    out = Console(highlight=False, soft_wrap=True)
    if installed:
        manifest = code_manifest()
        _files_table(out, f"installed hospital runtime: what runs here ({len(manifest.files)} files)", manifest)
        out.print(f"runtime code hash: {manifest.code_hash}")
        return
    approved = read_approved(list_path)
    if pending:
        folder = list_path.parent / PENDING_DIR
        waiting = sorted(folder.glob("*.fab")) if folder.is_dir() else []
        fresh = [p for p in waiting if not any(e["fab_hash"] == p.stem for e in approved)]
        out.print(escape("\n".join(str(p) for p in fresh)) if fresh else f"no refused app packages waiting in {folder}")
        return
    if fab is None:
        raise RetuneError("name the app package to review: --fab FILE (or --pending to list refused ones)")
    package = AppPackage.from_file(fab)
    _files_table(out, f"app package {package.app} ({len(package.manifest.files)} files)", package.manifest)
    out.print(f"package hash: {package.fab_hash}")
    if package.run_config:
        out.print("default run config: " + escape(" ".join(f"{k}={v!r}" for k, v in package.run_config.items())))
    if node_config is not None:
        _floor_table(out, package.run_config, node_config)
    differs = hospital_code_diff(package)
    if differs.empty:
        out.print("its client/ and shared/ equal the installed hospital runtime")
    else:
        out.print(f"[bold yellow]its client/ and shared/ differ from the installed hospital runtime[/] "
                  f"({len(differs.changed)} changed, {len(differs.added)} added, {len(differs.removed)} removed): "
                  "those files never run here; this hospital runs its installed retune-fl")
        _print_diff(out, differs)
    existing = find_approval(list_path, package.fab_hash)
    if existing is not None:
        out.print(escape(f"already approved by {existing.get('approved_by')} at {existing.get('approved_at')}"
                         + (f" ({existing['note']})" if existing.get("note") else "")))
        return
    previous = approved[-1] if approved else None
    if previous is None:
        out.print("not approved yet; no earlier approval to compare with")
    else:
        diff = diff_files(previous.get("files", {}), package.manifest.as_dict())
        out.print(escape(f"not approved yet; since {previous['fab_hash'][:16]} ({previous.get('app')}, approved "
                         f"{previous.get('approved_at')}): {len(diff.changed)} changed, {len(diff.added)} added, "
                         f"{len(diff.removed)} removed"))
        _print_diff(out, diff)
    if show:
        return
    if not yes and not typer.confirm(f"approve app package {package.fab_hash[:16]} in {list_path}?", default=False):
        out.print("not approved")
        raise typer.Exit(1)
    entry = add_approval(list_path, package, by or _login(), note)
    out.print(escape(f"approved {entry['fab_hash']} by {entry['approved_by']} at {entry['approved_at']} in "
                     f"{list_path}"))


def _files_table(out: Console, title: str, manifest) -> None:
    table = Table(title=escape(title))
    table.add_column("file", overflow="fold")
    table.add_column("bytes", justify="right")
    table.add_column("sha256", overflow="fold", min_width=16)
    for f in manifest.files:  # names come from the package: shown as text, never as markup
        table.add_row(escape(f.path), str(f.size), escape(f.sha256))
    out.print(table)


def _floor_table(out: Console, run_config: dict, node_config: str) -> None:
    """The package's default run config against the hospital's privacy floor. A run may override its defaults,
    so the floor, not this table, is what protects the hospital: every run is checked against it at every
    message."""
    from client.floor import PrivacyFloor, parse_node_config
    from shared.config import FederationConfig

    floor = PrivacyFloor.from_node_config(parse_node_config(node_config))
    config = FederationConfig.from_run_config(run_config)
    table = Table(title="the package's default run config against this hospital's privacy floor")
    for column in ("setting", "this hospital's floor", "the package's default", "verdict"):
        table.add_column(column, overflow="fold")
    for row in floor.rows(config):
        verdict = "[bold red]REFUSED[/]" if row[3] == "REFUSED" else escape(row[3])
        table.add_row(*(escape(cell) for cell in row[:3]), verdict)
    out.print(table)
    out.print("a run may override the defaults; whatever it asks, one below this floor is refused at every message")


def _print_diff(out: Console, diff) -> None:
    for sign, paths in (("~", diff.changed), ("+", diff.added), ("-", diff.removed)):
        for path in paths:
            out.print(f"  {sign} {escape(path)}")


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        raise typer.BadParameter("cannot tell who you are: pass --by NAME", param_hint="--by") from None
