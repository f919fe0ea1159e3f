"""``retune certs``: the federation's CA, the SuperLink's TLS certificate and the server's SuperExec secret."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from deploy.certs import DEFAULT_SANS, make_certificates, summary

OutOpt = Annotated[Path, typer.Option("--out", help="Folder for ca.crt, ca.key, server.pem/.key, superexec.secret.")]
SanOpt = Annotated[Optional[list[str]], typer.Option(
    "--san", help="Host name or IP address the SuperLink and gateway are reached at; repeat for several "
                  "(default: 127.0.0.1 and localhost).")]
DaysOpt = Annotated[int, typer.Option("--days", help="Validity of the certificates in days.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace existing files (every party needs the new ca.crt).")]


def certs(out: OutOpt = Path("certs"), san: SanOpt = None, days: DaysOpt = 365, force: ForceOpt = False) -> None:
    """Create the federation's CA, the SuperLink's TLS certificate and the server's SuperExec secret (the
    operator's side; each hospital makes its own key pair with `retune hospital keys`)."""
    bundle = make_certificates(out, list(san) if san else list(DEFAULT_SANS), days, force)
    Console(soft_wrap=True).print(summary(bundle), markup=False, highlight=False)
