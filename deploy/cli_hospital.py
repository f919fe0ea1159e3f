"""``retune hospital``: what hospital IT runs at a client site (its keys, and its own ClientApp runtime)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

hospital_app = typer.Typer(help="Run a hospital site: its own keys and its own ClientApp runtime.",
                           no_args_is_help=True)
console = Console(stderr=True, highlight=False)


@hospital_app.callback()
def _hospital() -> None:
    """Run a hospital site: its own keys and its own ClientApp runtime."""


@hospital_app.command()
def keys(
    out: Annotated[Path, typer.Option("--out", help="Folder for auth.key, auth.pub and superexec.secret.")],
    name: Annotated[str, typer.Option(help="The hospital's name (a comment in auth.pub).")] = "hospital",
    force: Annotated[bool, typer.Option("--force", help="Replace existing keys (the operator must register the "
                                                        "new auth.pub).")] = False,
) -> None:
    """Make this hospital's SuperNode key pair and its runtime's secret; only auth.pub goes to the operator."""
    from deploy.certs import make_hospital_keys

    made = make_hospital_keys(out, name, force)
    console.print(f"wrote {made.private_key} (private, stays here), {made.superexec_secret} (private, shared by "
                  f"this hospital's SuperNode and runtime only) and {made.public_key}")
    console.print(f"send {made.public_key} to the consortium operator, who registers it; nothing else leaves")


@hospital_app.command()
def serve(
    runtime_api: Annotated[str, typer.Option(help="host:port of this hospital's SuperNode Runtime API "
                                                  "(flower-supernode --host/--port).")] = "127.0.0.1:9094",
    superexec_secret: Annotated[Path, typer.Option(help="The secret shared with the SuperNode "
                                                        "(--superexec-auth-secret-file).")] = Path("superexec.secret"),
    root_certificates: Annotated[Optional[Path], typer.Option(help="CA of the Runtime API's TLS certificate (default: "
                                                                   "plain HTTP on the hospital's own network).")] = None,
    poll_interval: Annotated[float, typer.Option(help="Seconds between task polls when idle.")] = 0.2,
) -> None:
    """Serve the SuperNode's tasks with the installed retune-fl: approved app packages only, nothing from a run."""
    from client.approval import running_code
    from client.runtime import HospitalRuntime, TaskOutcome
    from shared.task_runtime import RuntimeSettings, read_secret

    secret = read_secret(superexec_secret)
    logging.getLogger("client").setLevel(logging.INFO)
    logging.getLogger("flwr").setLevel(logging.WARNING)

    def report(outcome: TaskOutcome, seconds: float) -> None:
        what = f"run {outcome.run_id} {outcome.message_type}"
        if outcome.served:
            console.print(f"served {what} in {seconds:.1f} s (app package {outcome.fab_hash[:12]})")
        else:
            console.print(f"[bold red]refused[/] {what}: {outcome.detail}")

    runtime = HospitalRuntime(RuntimeSettings(runtime_api, secret, str(root_certificates) if root_certificates
                                              else None, poll_interval), on_task=report)
    console.print(f"hospital runtime {running_code().code_hash[:16]} (installed retune-fl) serving the SuperNode at "
                  f"{runtime_api}; approved app packages only")
    runtime.serve_until_signalled()
    console.print("hospital runtime stopped")
