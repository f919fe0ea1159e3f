"""``retune keys``: the consortium's Ed25519 key pair that signs global adaptors and checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def keys(
    out: Annotated[Path, typer.Option(help="Folder for consortium.key (private, mode 0600) and consortium.pub.")],
    force: Annotated[bool, typer.Option(help="Replace an existing key pair.")] = False,
) -> None:
    """Write a new consortium key pair: the server keeps consortium.key, every hospital gets consortium.pub."""
    from shared.signing import generate_keys, key_id

    private, public = generate_keys(out, force=force)
    typer.echo(f"wrote {private} (keep it on the server, mode 0600) and {public} (give it to every hospital: "
               f"node config consortium-key, retune evaluate/predict --public-key); key id {key_id(public)}")
