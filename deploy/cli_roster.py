"""``retune roster``: the consortium's roster of member hospitals, for secure aggregation (see shared/identity.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from shared.errors import RetuneError


def roster(
    out: Annotated[Path, typer.Option("--out", help="The roster file to hand every hospital.")],
    hospital: Annotated[list[str], typer.Option("--hospital", help="NAME=PUBLIC_KEY_FILE: a member's name (its "
                                                                   "node-config name) and the auth.pub it sent; "
                                                                   "repeat for each member.")],
) -> None:
    """Write the roster every hospital checks secure-aggregation key announcements against."""
    from shared.identity import Roster, fingerprint

    members = {}
    for entry in hospital:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise RetuneError(f"--hospital {entry!r} is not NAME=PUBLIC_KEY_FILE")
        if name in members:
            raise RetuneError(f"--hospital names {name!r} twice")
        members[name] = Path(path)
    written = Roster.write(out, members)
    console = Console(highlight=False)
    for name, key in Roster.read(written).keys.items():
        console.print(f"{name}: {fingerprint(key)}")
    console.print(f"wrote {written}; every hospital gets a copy and checks the fingerprints with its peers")
