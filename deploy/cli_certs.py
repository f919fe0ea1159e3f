"""``retune certs``: the CA, SuperLink TLS certificate and hospital SuperNode keys of a federation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from deploy.certs import DEFAULT_SANS, make_certificates, summary

OutOpt = Annotated[Path, typer.Option("--out", help="Folder for ca.crt, server.pem/.key and hospital-K/ keys.")]
HospitalsOpt = Annotated[int, typer.Option("--hospitals", help="Hospital SuperNode key pairs (hospital-0, ...).")]
SanOpt = Annotated[Optional[list[str]], typer.Option(
    "--san", help="Host name or IP address the SuperLink is reached at; repeat for several "
                  "(default: 127.0.0.1 and localhost).")]
DaysOpt = Annotated[int, typer.Option("--days", help="Validity of the certificates in days.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace existing certificates and keys.")]


def certs(out: OutOpt = Path("certs"), hospitals: HospitalsOpt = 2, san: SanOpt = None, days: DaysOpt = 365,
          force: ForceOpt = False) -> None:
    """Create the federation's CA, the SuperLink's TLS certificate, SuperExec secrets and one authentication key
    pair per hospital; print which file goes where."""
    bundle = make_certificates(out, hospitals, list(san) if san else list(DEFAULT_SANS), days, force)
    Console(soft_wrap=True).print(summary(bundle), markup=False, highlight=False)
