"""``retune federation``: bring a deployed federation up on this machine, look at it, take it down."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

federation_app = typer.Typer(help="A deployed federation as real processes on 127.0.0.1 (TLS, node "
                                  "authentication, hospital-owned runtimes).", no_args_is_help=True)
console = Console(stderr=True, highlight=False)
DirOpt = Annotated[Path, typer.Option("--dir", help="The federation's folder (keys, data, logs, state).")]
FloorOpt = Annotated[Optional[list[str]], typer.Option(
    "--floor", help="Hospitals' privacy floor, as node-config keys: 'key=value ...' for every hospital, "
                    "'hospital-K: key=value ...' for one (repeat; e.g. 'require-secure-aggregation=true').")]


@federation_app.callback()
def _federation() -> None:
    """A deployed federation as real processes on 127.0.0.1."""


@federation_app.command()
def up(
    dir: DirOpt,
    hospitals: Annotated[int, typer.Option(help="Hospitals, each a SuperNode and its own runtime.")] = 3,
    images: Annotated[int, typer.Option(help="Phantom images per hospital.")] = 300,
    image_size: Annotated[int, typer.Option(help="Phantom image size in pixels.")] = 128,
    app: Annotated[Path, typer.Option(help="The app folder you will `flwr run`: every hospital approves its "
                                           "package (a stand-in for IT's review).")] = Path("."),
    backbone: Annotated[Optional[str], typer.Option(help="The hospitals' backbone (node config; default: the "
                                                         "offline default).")] = None,
    dp_epsilon: Annotated[Optional[float], typer.Option(help="DP-SGD at every hospital with this ε budget.")] = None,
    floor: FloorOpt = None,
) -> None:
    """Start the federation (or restart what is not running), then say how to submit a run."""
    from deploy.launcher import CONNECTION, Layout, up as start

    with console.status("bringing the federation up (first time: keys, phantom data, embeddings)"):
        record = start(dir, hospitals, images, image_size, app=app, backbone=backbone, dp_epsilon=dp_epsilon,
                       floors=floor)
    layout = Layout(dir.resolve())
    console.print(f"federation up in {layout.root}: SuperLink (Control API) at 127.0.0.1:{record['ports']['superlink']},"
                  f" gateway (Fleet API) at 127.0.0.1:{record['ports']['gateway']}, "
                  f"{len(record['hospitals'])} hospitals online")
    console.print(f"submit a run:  FLWR_HOME={layout.flwr_home} flwr run . {CONNECTION} --stream")
    console.print(f"look at it:    retune federation status --dir {dir}")
    console.print(f"stop it:       retune federation down --dir {dir}")


@federation_app.command()
def status(
    dir: DirOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Processes, connected hospitals and runs (with their Flower status)."""
    from deploy.launcher import status as read

    state = read(dir)
    if as_json:
        print(json.dumps(state, indent=2))
        return
    out = Console(highlight=False)
    table = Table(title=f"processes ({state['dir']})")
    for column in ("process", "pid", "state", "log"):
        table.add_column(column)
    for name, p in state["processes"].items():
        table.add_row(name, str(p["pid"]), "[green]running" if p["running"] else "[red]stopped", p["log"])
    out.print(table)
    table = Table(title="hospitals")
    for column in ("hospital", "node id", "connected"):
        table.add_column(column)
    for name, h in state["hospitals"].items():
        shown = "?" if h["online"] is None else ("[green]yes" if h["online"] else "[red]no")
        table.add_row(name, str(h["node_id"]), shown)
    out.print(table)
    table = Table(title="runs")
    for column in ("run id", "status", "app", "details"):
        table.add_column(column, overflow="fold")
    for run in state["runs"]:
        colour = "red" if "fail" in str(run["status"]) else "green" if "finished" in str(run["status"]) else "yellow"
        table.add_row(str(run["run_id"]), f"[{colour}]{run['status']}", str(run["app"]), str(run["details"]))
    out.print(table)


@federation_app.command()
def compose(
    hospitals: Annotated[int, typer.Option(help="Hospitals in the compose project.")] = 2,
    floor: FloorOpt = None,
) -> None:
    """Print docker-compose.yml for this many hospitals: the same processes and flags as `up`, in containers."""
    from deploy.compose import render

    print(render(hospitals, floor or []), end="")


@federation_app.command()
def down(dir: DirOpt) -> None:
    """Stop exactly the processes `up` started; keys, data, logs and state stay."""
    from deploy.launcher import down as stop

    stopped = stop(dir)
    console.print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
