"""``retune approve``: hospital IT reviews the code that would run at the hospital and approves its hash."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table


def approve(
    list_path: Annotated[Path, typer.Option("--list", help="The hospital's approved-apps JSON (node config "
                                                           "`approved-apps`); created on first approval.")],
    note: Annotated[str, typer.Option(help="Why this version is approved (ticket, review).")] = "",
    show: Annotated[bool, typer.Option("--show", help="Only show the hash and files; approve nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Approve without asking (non-interactive).")] = False,
    by: Annotated[Optional[str], typer.Option(help="Who approves (default: the login name).")] = None,
    source: Annotated[Optional[Path], typer.Option(help="Folder holding the client/ and shared/ to approve, e.g. "
                                                        "an unpacked FAB (default: the installed packages).")] = None,
) -> None:
    """Show the code hash and every hashed file, what changed since the last approval, then approve it."""
    from client.approval import add_approval, code_manifest, diff_manifest, read_approved

    out = Console(highlight=False, soft_wrap=True)
    manifest = code_manifest(source)
    approved = read_approved(list_path)
    table = Table(title=f"code that runs at the hospital ({len(manifest.files)} files)")
    table.add_column("file", overflow="fold")
    table.add_column("bytes", justify="right")
    table.add_column("sha256", overflow="fold", min_width=16)
    for f in manifest.files:
        table.add_row(f.path, str(f.size), f.sha256)
    out.print(table)
    out.print(f"code hash: {manifest.code_hash}")
    existing = next((e for e in approved if e["code_hash"] == manifest.code_hash), None)
    if existing is not None:
        out.print(f"already approved by {existing.get('approved_by')} at {existing.get('approved_at')}"
                  + (f" ({existing['note']})" if existing.get("note") else ""))
        return
    previous = next((e for e in reversed(approved) if isinstance(e.get("files"), dict)), None)
    if previous is None:
        out.print("not approved yet" + (" (no earlier approval with a file list to compare)" if approved else ""))
    else:
        diff = diff_manifest(previous["files"], manifest)
        out.print(f"not approved yet; since {previous['code_hash'][:16]} (approved {previous.get('approved_at')}): "
                  f"{len(diff.changed)} changed, {len(diff.added)} added, {len(diff.removed)} removed")
        for sign, paths in (("~", diff.changed), ("+", diff.added), ("-", diff.removed)):
            for path in paths:
                out.print(f"  {sign} {path}")
    if show:
        return
    if not yes and not typer.confirm(f"approve code {manifest.code_hash[:16]} in {list_path}?", default=False):
        out.print("not approved")
        raise typer.Exit(1)
    entry = add_approval(list_path, manifest, by or _login(), note)
    out.print(f"approved {entry['code_hash']} by {entry['approved_by']} at {entry['approved_at']} in {list_path}")


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        raise typer.BadParameter("cannot tell who you are: pass --by NAME", param_hint="--by") from None
