"""The consortium's ServerApp runtime: the only process that holds the signing key, and it signs only what the
installed ServerApp computes for runs of app packages the operator approved.

Flower's ``flower-superexec`` starts ``flwr-serverapp`` for every run, which imports the ServerApp of the run's app
package: with the signing key in its environment, whoever can submit a run could sign rounds and checkpoints as the
consortium. This runtime replaces it (``retune server serve``), as :mod:`client.runtime` does at a hospital. For each
ServerApp task it

1. pulls the run, its context and its app package (FAB) from the SuperLink's Runtime API; the package is hashed and,
   when refused, kept for review (``pending/`` beside the approved list), never unpacked or imported;
2. checks the hash against the operator's approved list (``--approved-apps``, the format ``retune approve`` writes)
   **before anything else**: an unapproved run fails with a fixed reason (``flwr list`` shows it), nothing is signed;
3. runs the installed ServerApp (:func:`server.app.make_server_app`) with the key it loaded at start
   (``--signing-key``; never an environment variable a run could inherit) and the run config Flower fuses from the
   package's defaults and the run's overrides, its log lines streamed to ``flwr run --stream``;
4. reports the run completed or failed.

A run-state seal register beside the runtime's state (``--state``) keeps the last sealed round of every run folder,
so an older, validly sealed folder put back is refused (:class:`server.state.SealRegister`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Callable

from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_fab
from flwr.common.constant import SubStatus
from flwr.common.serde import context_from_proto, context_to_proto, fab_from_proto, run_from_proto
from flwr.proto.runtime_pb2 import PullTaskInputRequest, PushTaskOutputRequest  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.logger import flush_logs, start_log_uploader, stop_log_uploader
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import HttpGrid

from shared.app_packages import package_problem
from shared.errors import RetuneError
from shared.task_runtime import RuntimeSettings, TaskRuntime

log = logging.getLogger(__name__)
#: What a refused run's status says (the detail stays in the runtime's log).
NOT_APPROVED = "the consortium's server runtime has not approved this run's app package (retune approve)"
ServerAppFn = Callable[[Grid, Context], None]


@dataclass(frozen=True)
class RunOutcome:
    """One ServerApp task: the run, its package, and whether it was served (and why not)."""

    run_id: int
    fab_hash: str
    served: bool
    detail: str = ""


class _LogLines(logging.Handler):
    """Every log record of this process, as a line for the run's stream (``flwr run --stream``)."""

    def __init__(self, queue: Queue) -> None:
        super().__init__(logging.INFO)
        self.queue = queue
        self.setFormatter(logging.Formatter("%(levelname)s : %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.queue.put(self.format(record) + "\n")


class ServerRuntime(TaskRuntime):
    """Acquires the SuperLink's ServerApp tasks and serves approved ones with ``app`` (default: the installed
    ServerApp with ``signing_key`` and the seal register under ``state``)."""

    component, task_type, peer = "flwr-serverapp", TaskType.SERVER_APP, "the SuperLink's Runtime API"

    def __init__(self, settings: RuntimeSettings, approved: Path, signing_key: Path, state: Path,
                 app: ServerAppFn | None = None, on_task: Callable[[RunOutcome], None] | None = None) -> None:
        from shared.signing import load_private_key

        super().__init__(settings)
        self.approved = Path(approved)
        self.key = load_private_key(signing_key)  # read once: a missing or wrong key stops the runtime at start
        self.state = Path(state)
        self._app = app
        self._on_task = on_task

    @property
    def app(self) -> ServerAppFn:
        if self._app is None:
            from server.app import make_server_app

            self._app = make_server_app(signing_key=self.key, seals=self.state / "seals.json")
        return self._app

    def serve(self, token: str, fab_hash: str) -> RunOutcome:
        grid = HttpGrid(self.settings.runtime_api, insecure=self.settings.root_certificates is None,
                        root_certificates=Path(self.settings.root_certificates).read_bytes()
                        if self.settings.root_certificates else None, token=token)
        client = grid._runtime_client  # noqa: SLF001  the task's Runtime API connection, as flwr-serverapp uses it
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        lines: Queue = Queue()
        handler, uploader, context = None, None, None
        outcome = RunOutcome(0, fab_hash, False, "the task could not be read")
        status, details = SubStatus.FAILED, "the server runtime failed on this run"
        try:
            task = client.PullTaskInput(PullTaskInputRequest())
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (task.task_id, task.run.run_id,
                                                                               task.context.node_id)
            context, run, fab = context_from_proto(task.context), run_from_proto(task.run), fab_from_proto(task.fab)
            grid.set_run(run)
            uploader = start_log_uploader(lines, 0, run.run_id, client)
            handler = _LogLines(lines)
            logging.getLogger().addHandler(handler)
            problem = package_problem(self.approved, fab.hash_str, fab.content)
            if problem is not None:
                log.warning("refused run %d: %s", run.run_id, problem)
                details = NOT_APPROVED
                outcome = RunOutcome(run.run_id, fab.hash_str, False, problem)
            else:
                context.run_config = get_fused_config_from_fab(fab.content, run)
                self.app(grid, context)
                status, details = SubStatus.COMPLETED, ""
                outcome = RunOutcome(run.run_id, fab.hash_str, True)
        except (RetuneError, RuntimeError, ValueError) as exc:
            log.error("the ServerApp stopped: %s", exc)
            details = f"ServerApp failed: {exc}"
            outcome = RunOutcome(outcome.run_id, fab_hash, True, str(exc))
        finally:
            if handler is not None:
                logging.getLogger().removeHandler(handler)
            if uploader is not None:
                flush_logs(lines)
                stop_log_uploader(lines, uploader)
            heartbeat.stop()
            if context is not None:
                context.state = RecordDict()
            client.PushTaskOutput(PushTaskOutputRequest(context=context_to_proto(context) if context else None,
                                                        sub_status=status, details=details))
            grid.close()
        if self._on_task is not None:
            self._on_task(outcome)
        return outcome
