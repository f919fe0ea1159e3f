"""A tampering operator, or whoever can submit runs: the server's keys, its run folders, the packages people review
and the gateway's door."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

from deploy.redteam import attack
from deploy.redteam.bench import Bench, brief

#: Programs that import and run a run's own app package (Flower's per-run processes).
RUNS_SUBMITTED_CODE = ("flower-superexec", "flwr-serverapp", "flwr-clientapp")


def _package(bench: Bench) -> bytes:
    """An app package as ``flwr build`` makes it from the installed retune-fl's app files."""
    from flwr.cli.build import build_fab_from_disk

    import client

    source = Path(client.__file__).resolve().parents[1]
    app = bench.root / "app" / "retune-fl"
    if not app.exists():
        for part in ("client", "server", "shared"):
            shutil.copytree(source / part, app / part, ignore=shutil.ignore_patterns("__pycache__", "assets"))
        for part in ("pyproject.toml", "README.md"):
            shutil.copy(source / part, app / part)
    return build_fab_from_disk(app)


def _package_with(bench: Bench, name: str, changes: dict[str, Callable[[bytes], bytes]]) -> Path:
    """A copy of that app package at ``bench.root / name`` with each file named in ``changes`` rewritten by its
    function (a name the package lacks is added, from empty content)."""
    path = bench.root / name
    with zipfile.ZipFile(path, "w") as fab, zipfile.ZipFile(io.BytesIO(_package(bench))) as source:
        for info in source.infolist():
            data = source.read(info)
            fab.writestr(info, changes[info.filename](data) if info.filename in changes else data)
        for added in sorted(changes.keys() - set(source.namelist())):
            fab.writestr(added, changes[added](b""))
    return path


@attack("signing-key-in-submitted-code", "anyone who can submit a run", "submit a run whose ServerApp reads the "
        "consortium's signing key, to sign rounds and checkpoints as the consortium")
def signing_key(bench: Bench) -> tuple[bool, str]:
    from deploy.topology import server_services
    from deploy.launcher import Layout

    files = Layout(bench.root / "operator").server_files()
    exposed = [s.name for s in server_services(files, "127.0.0.1", "127.0.0.1", "127.0.0.1")
               if Path(s.argv[0]).name in RUNS_SUBMITTED_CODE
               and (files.signing_key in s.env.values() or files.signing_key in s.argv)]
    if exposed:
        return False, (f"the deployed {', '.join(exposed)} process, which imports each run's own ServerApp, holds the "
                       f"signing key ({files.signing_key}) in its environment")
    try:
        from server.runtime import package_problem  # what the server runtime checks before anything runs
    except ImportError:
        return False, "no process of the server site both holds the key and refuses unapproved runs"
    content = _package(bench)
    problem = package_problem(bench.root / "operator" / "approved.json", hashlib.sha256(content).hexdigest(), content)
    return problem is not None, ("the server runtime (the only holder of the key) refuses the run's package before "
                                 f"anything runs: {brief(problem, 70)}" if problem else "an unapproved package was served")


@attack("state-rollback", "operator", "put back a run folder from an earlier round (validly sealed in its day) and "
        "have the ServerApp resume from it")
def rollback(bench: Bench) -> tuple[bool, str]:
    return _tamper_state(bench, rollback=True)


@attack("forged-state", "operator", "edit a sealed run folder's adaptors and have the ServerApp resume and sign it")
def forged_state(bench: Bench) -> tuple[bool, str]:
    return _tamper_state(bench, rollback=False)


def _tamper_state(bench: Bench, rollback: bool) -> tuple[bool, str]:
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from server import state as server_state
    from shared.config import FederationConfig
    from shared.errors import RetuneError

    run = bench.root / "server-run" / ("rollback" if rollback else "forged")
    shutil.rmtree(run, ignore_errors=True)
    config = FederationConfig(run_dir=str(run))
    arrays = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    register = getattr(server_state, "SealRegister", None)
    seals = register(bench.root / "server-runtime" / "seals.json") if register else None
    opened = server_state.RunState.open(config, arrays, bench.signing_key, *([seals] if seals else []))
    opened.commit(arrays, {}, {"macro_auroc": 0.5}, key=bench.signing_key)
    earlier = run.with_name(run.name + "-round-1")
    shutil.rmtree(earlier, ignore_errors=True)
    shutil.copytree(run, earlier)
    opened.commit(ArrayRecord({"w": Array(np.ones(4, dtype=np.float32))}), {}, {"macro_auroc": 0.6},
                  key=bench.signing_key)
    if rollback:
        shutil.rmtree(run)
        shutil.copytree(earlier, run)
    else:
        state = server_state.STATE
        saved = (run / state).read_text()
        name = json.loads(saved)["arrays"]
        from safetensors.numpy import save_file

        save_file({"w": np.full(4, 9, dtype=np.float32)}, run / name)
    try:
        resumed = server_state.RunState.open(config, arrays, bench.signing_key, *([seals] if seals else []))
    except RetuneError as exc:
        return True, f"refused ({brief(str(exc))})"
    return False, f"the ServerApp resumed at round {resumed.server_round} of a folder " \
                  f"{'put back from round 1' if rollback else 'with adaptors edited'}, to sign it onwards"


@attack("foreign-code", "server", "submit a run whose app package the hospital never approved (its client/ "
        "rewritten), hoping the hospital imports it")
def foreign_code(bench: Bench) -> tuple[bool, str]:
    from flwr.app import ConfigRecord, Message, RecordDict

    from client.runtime import serve_task

    hospital = bench.reset()[0]
    package = _package_with(bench, "foreign.fab", {
        "client/app.py": lambda data: data + b"\nraise SystemExit('the package ran at the hospital')\n"}).read_bytes()
    hospital.join(100, {})
    ran: list[Message] = []
    node_config = {**hospital.node_config, "approved-apps": str(hospital.folder / "state" / "approved.json")}
    hospital.context.node_config.update(node_config)
    message = bench.message(hospital, "evaluate", RecordDict({"config": ConfigRecord({"stage": 0, "round": 0})}), 100)
    reply, outcome = serve_task(message, hospital.context, hashlib.sha256(package).hexdigest(), package,
                                lambda msg, context: ran.append(msg) or msg)
    held = reply.has_error() and not ran and not outcome.served
    return held, (f"refused before anything ran ({brief(reply.error.reason, 60)})" if held
                  else "the hospital served a package it never approved")


@attack("approve-markup", "server", "ship a file named [conceal]server/exfiltrate.py[/conceal] in the app package, "
        "so that the review shows it as server/exfiltrate.py or not at all")
def approve_markup(bench: Bench) -> tuple[bool, str]:
    from typer.testing import CliRunner

    from deploy.cli import app

    hidden = "[conceal]server/exfiltrate.py[/conceal]"
    path = _package_with(bench, "markup.fab", {hidden: lambda _: b"import os\n"})
    shown = CliRunner().invoke(app, ["approve", "--list", str(bench.root / "approved.json"), "--fab", str(path),
                                     "--show"], env={"COLUMNS": "400"})
    held = hidden in shown.stdout
    return held, ("the review names the file as it is named" if held
                  else "the review hid the file's name (rendered as markup)")


@attack("gateway-oversized-body", "anyone on the network", "stream a request body far over the gateway's limit, "
        "to make it hold the whole body in memory before it checks the size")
def gateway_body(bench: Bench) -> tuple[bool, str]:
    import asyncio

    from deploy.gateway import MAX_BODY, gateway_app

    chunk, sent = b"x" * (1 << 20), [0]
    chunks = MAX_BODY // len(chunk) + 16

    async def receive():
        sent[0] += 1
        return {"type": "http.request", "body": chunk, "more_body": sent[0] < chunks}

    status: list[int] = []

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "https",
             "path": "/v1/fleet/push-object", "raw_path": b"/v1/fleet/push-object", "query_string": b"",
             "root_path": "", "headers": [], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 9092)}
    asyncio.run(gateway_app("127.0.0.1:9", ca_file=None)(scope, receive, send))
    read = sent[0] * len(chunk)
    held = status == [413] and read <= MAX_BODY + len(chunk)
    return held, f"the gateway read {read / 2**20:.0f} MiB of a {chunks} MiB body before answering {status}"
