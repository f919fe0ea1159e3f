"""``retune gateway``: the Fleet-only HTTPS door of the consortium server (see :mod:`deploy.gateway`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deploy.topology import GATEWAY_PORT, SUPERLINK_PORT


def gateway(
    superlink: Annotated[str, typer.Option(help="host:port of the SuperLink (a name its certificate holds).")]
    = f"127.0.0.1:{SUPERLINK_PORT}",
    listen: Annotated[str, typer.Option(help="host:port hospitals connect to.")] = f"0.0.0.0:{GATEWAY_PORT}",
    ca: Annotated[Path, typer.Option(help="The federation CA (verifies the SuperLink).")] = Path("ca.crt"),
    cert: Annotated[Path, typer.Option(help="TLS certificate hospitals verify (server.pem).")] = Path("server.pem"),
    key: Annotated[Path, typer.Option(help="Its private key (server.key).")] = Path("server.key"),
) -> None:
    """Forward the Fleet API to the SuperLink and refuse everything else (the Control API stays with the
    operator)."""
    from deploy.gateway import serve
    from shared.errors import RetuneError

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise RetuneError(f"--listen {listen!r} is not host:port")
    for path in (ca, cert, key):
        if not path.is_file():
            raise RetuneError(f"{path} does not exist (retune certs writes ca.crt, server.pem and server.key)")
    serve(host.strip("[]"), int(port), superlink, str(cert), str(key), str(ca))
