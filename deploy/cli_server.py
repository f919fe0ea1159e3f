"""``retune server``: what the consortium operator runs besides Flower's SuperLink (its own ServerApp runtime)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from deploy.topology import SUPERLINK_PORT

server_app = typer.Typer(help="Run the consortium's server side: its own ServerApp runtime.", no_args_is_help=True)
console = Console(stderr=True, highlight=False)


@server_app.callback()
def _server() -> None:
    """Run the consortium's server side: its own ServerApp runtime."""


@server_app.command()
def serve(
    runtime_api: Annotated[str, typer.Option(help="host:port of the SuperLink's Runtime API (its --port).")]
    = f"127.0.0.1:{SUPERLINK_PORT}",
    superexec_secret: Annotated[Path, typer.Option(help="The secret shared with the SuperLink "
                                                        "(--superexec-auth-secret-file).")] = Path("superexec.secret"),
    signing_key: Annotated[Path, typer.Option(help="The consortium's signing key (consortium.key from `retune keys`): "
                                                   "read by this process only.")] = Path("consortium.key"),
    approved_apps: Annotated[Path, typer.Option(help="The operator's approved app packages (`retune approve "
                                                     "--list`); other runs are refused.")] = Path("approved.json"),
    state: Annotated[Path, typer.Option(help="This runtime's own folder: the register of sealed rounds, outside "
                                             "the run folders.")] = Path("retune-server"),
    root_certificates: Annotated[Optional[Path], typer.Option(help="CA of the SuperLink's TLS certificate (default: "
                                                                   "plain HTTP).")] = None,
    poll_interval: Annotated[float, typer.Option(help="Seconds between task polls when idle.")] = 0.5,
) -> None:
    """Serve the SuperLink's ServerApp tasks with the installed retune-fl: approved app packages only, signed with
    the key only this process reads."""
    from server.runtime import RunOutcome, ServerRuntime
    from shared.task_runtime import RuntimeSettings, read_secret

    secret = read_secret(superexec_secret)
    logging.getLogger("server").setLevel(logging.INFO)
    logging.getLogger("flwr").setLevel(logging.WARNING)

    def report(outcome: RunOutcome) -> None:
        if outcome.served:
            console.print(f"run {outcome.run_id} ended (app package {outcome.fab_hash[:12]})"
                          + (f": {escape(outcome.detail)}" if outcome.detail else ""))
        else:
            console.print(f"[bold red]refused[/] run {outcome.run_id}: {escape(outcome.detail)}")

    settings = RuntimeSettings(runtime_api, secret, str(root_certificates) if root_certificates else None,
                               poll_interval)
    runtime = ServerRuntime(settings, approved_apps, signing_key, state, on_task=report)
    console.print(f"serving ServerApp tasks of {runtime_api}: approved app packages in {approved_apps} only")
    runtime.serve_until_signalled()
