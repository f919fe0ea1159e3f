"""``retune redteam``: every known attack on a hospital, run against the installed retune-fl (see
:mod:`deploy.redteam`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from shared.config import OFFLINE_DEFAULT


def redteam(
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcomes as JSON instead of one line each.")]
    = False,
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Run this attack only (repeat for several; "
                                                                     "--list shows them).")] = None,
    list_attacks: Annotated[bool, typer.Option("--list", help="List the attacks and exit.")] = False,
    backbone: Annotated[str, typer.Option(help="The backbone the bench's hospitals embed with (the code under "
                                               "attack is the same whatever it is).")] = OFFLINE_DEFAULT,
    images: Annotated[int, typer.Option(min=120, help="Phantom images per bench hospital.")] = 300,
    dir: Annotated[Optional[Path], typer.Option("--dir", help="Where the bench lives (default: a new temporary "
                                                              "folder).")] = None,
    node_config: Annotated[Optional[str], typer.Option(help="Your hospital's node config, as you give it to "
                                                            "flower-supernode --node-config: its privacy-floor keys "
                                                            "apply to every bench hospital (paths stay the bench's).")]
    = None,
) -> None:
    """Play a malicious server, a colluding peer and a tampering operator against the installed hospital code
    (real ClientApp, guard, ledger, secure aggregation and crypto, on phantom hospitals in this process): one line
    per attack, held or FAILED and what the attacker obtained; exit status 1 if any attack succeeds."""
    from client.floor import FLOOR_KEYS, PrivacyFloor, parse_node_config
    from deploy.redteam.run import known_attacks, run_attacks

    out = Console(highlight=False, soft_wrap=True)
    if list_attacks:
        for attack in known_attacks().values():
            out.print(f"{attack.name} ({attack.attacker}): {escape(attack.tries)}")
        return
    if not as_json:
        out.print(f"retune redteam: {len(only or known_attacks())} attacks against the installed hospital code "
                  "(phantom hospitals, in this process)")
    floor = {k: v for k, v in parse_node_config(node_config).items() if k in FLOOR_KEYS} if node_config else {}
    PrivacyFloor.from_node_config(floor)  # a malformed floor is an error before anything runs
    outcomes = run_attacks(only, backbone, images, dir,
                           on_outcome=None if as_json else lambda o: out.print(escape(o.line())), floor=floor)
    failed = [o for o in outcomes if not o.held]
    if as_json:
        print(json.dumps({"attacks": [{"attack": o.attack, "held": o.held, "obtained": o.obtained}
                                      for o in outcomes], "failed": len(failed)}, indent=2))
    else:
        out.print(f"{len(outcomes) - len(failed)} of {len(outcomes)} attacks held"
                  + (f"; FAILED: {', '.join(o.attack for o in failed)}" if failed else ""))
    if failed:
        raise typer.Exit(1)
