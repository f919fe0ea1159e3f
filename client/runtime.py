"""The hospital's own ClientApp runtime: serves its SuperNode's tasks with the installed retune-fl only.

With ``flower-supernode --isolation process`` the SuperNode relays messages and runs no app code; whatever acquires
tasks from its Runtime API decides what runs at the hospital. Flower's ``flower-superexec`` would start
``flwr-clientapp``, which unpacks the run's app package (FAB) and imports it first on ``sys.path``: the package the
run's submitter sent would then decide how hospital data are read and what leaves. This runtime replaces it
(``retune hospital serve``). For each task it

1. pulls the message, the node context and the run's app package; the package's bytes are hashed and, when
   refused, kept for review (``pending/`` beside the approved list), never unpacked or imported;
2. checks that hash against the hospital's approved list (node config ``approved-apps``) **before anything else**:
   an unapproved package is refused with a fixed reason, written to the audit log, and no data are touched;
3. runs the ClientApp of the installed distribution (:data:`client.app.app`, with the boundary guard, audit log,
   signature check, DP-SGD and ε ledger) in this process, so the backbone and the embedding cache stay loaded
   between messages;
4. pushes the reply and the node state back to the SuperNode.

A deployed hospital must configure ``approved-apps``, ``audit-log`` and ``consortium-key``; without them every task
is refused (without the consortium's public key, no round could be checked). How it reaches the SuperNode and the
loop that serves tasks: :mod:`shared.task_runtime`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (make_confirm_message_received_fn_protobuf,
                                                                 make_pull_object_fn_protobuf)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from client.approval import APPROVED_APPS_KEY
from client.audit import AUDIT_LOG_KEY, REFUSED, AuditLog, message_entry
from shared.app_packages import package_problem
from shared.errors import RetuneError
from shared.task_runtime import RuntimeSettings, TaskRuntime, runtime_client, task_retries

log = logging.getLogger(__name__)
#: What the server learns when a hospital refuses a run's app package (the detail stays at the hospital).
NOT_APPROVED = "this hospital has not approved the run's app package; its IT reviews it with `retune approve`"
NOT_CONFIGURED = ("this hospital's runtime is not configured (approved list, audit log or consortium key "
                  "missing)")
#: Node-config keys a deployed hospital must set: without them its runtime serves nothing.
REQUIRED_KEYS = (APPROVED_APPS_KEY, AUDIT_LOG_KEY, "consortium-key")
#: Seconds to wait for a task's message to arrive whole from the SuperNode (Flower's default is two hours, which
#: a message whose transfer a restarting SuperLink cut off would hold this runtime for).
PULL_TIMEOUT = 120.0

App = Callable[[Message, Context], Message]


@dataclass(frozen=True)
class TaskOutcome:
    """What happened to one task: ``served`` (the app replied) or ``refused`` (and why, at the hospital)."""

    run_id: int
    message_type: str
    fab_hash: str
    served: bool
    detail: str = ""


def pull_task(client: RuntimeHttpClient) -> tuple[Message, Context, Fab]:
    """The task's message, node context and app package from the SuperNode, as Flower's ``pull_task_input``
    does, but waiting at most :data:`PULL_TIMEOUT` for the message's parts."""
    task = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (task.task_id, task.run.run_id,
                                                                       task.context.node_id)
    context, fab = context_from_proto(task.context), fab_from_proto(task.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode holds no message for this task")
    tree, node = pulled.message_object_trees[0], Node(node_id=context.node_id)
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, max_time=PULL_TIMEOUT)
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message does not carry its id
    return message, context, fab


def approval_problem(context: Context, fab_hash: str, fab_content: bytes) -> str | None:
    """Why the run's app package may not be served here (None: approved). Reads only the node config and the
    approved list."""
    missing = [key for key in REQUIRED_KEYS if not context.node_config.get(key)]
    if missing:
        return (f"node config lacks {', '.join(map(repr, missing))}: a deployed hospital needs "
                f"{', '.join(REQUIRED_KEYS)}")
    return package_problem(Path(str(context.node_config[APPROVED_APPS_KEY])), fab_hash, fab_content)


def serve_task(message: Message, context: Context, fab_hash: str, fab_content: bytes, app: App
               ) -> tuple[Message, TaskOutcome]:
    """The reply to one pulled task: the installed ``app``'s, or a refusal when the package is not approved.

    A refusal is logged and audited with its detail; the server learns a fixed reason only.
    """
    meta = message.metadata
    try:
        problem = approval_problem(context, fab_hash, fab_content)
    except (RetuneError, OSError) as exc:
        problem = f"the approved list cannot be read: {exc}"
    if problem is None:
        reply = app(message, context)
        return reply, TaskOutcome(meta.run_id, meta.message_type, fab_hash, served=True)
    configured = all(context.node_config.get(key) for key in REQUIRED_KEYS)
    reason = NOT_APPROVED if configured else NOT_CONFIGURED
    log.warning("refused a %s message of run %s: %s", meta.message_type, meta.run_id, problem)
    audit_path = context.node_config.get(AUDIT_LOG_KEY)
    if audit_path:
        try:
            AuditLog(str(audit_path)).append(message_entry(REFUSED, message, reason=problem, fab_hash=fab_hash))
        except (RetuneError, OSError) as exc:
            log.error("audit log %s: %s", audit_path, exc)
    reply = Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, reason), reply_to=message)
    return reply, TaskOutcome(meta.run_id, meta.message_type, fab_hash, served=False, detail=problem)


class HospitalRuntime(TaskRuntime):
    """Acquires the SuperNode's ClientApp tasks one at a time and serves each with :func:`serve_task`.

    ``app`` defaults to the installed :data:`client.app.app` (imported on first use, never from a run's package).
    """

    component, task_type, peer = "flwr-clientapp", TaskType.CLIENT_APP, "the SuperNode's Runtime API"

    def __init__(self, settings: RuntimeSettings, app: App | None = None,
                 on_task: Callable[[TaskOutcome, float], None] | None = None) -> None:
        super().__init__(settings)
        self._app = app
        self._on_task = on_task

    @property
    def app(self) -> App:
        if self._app is None:
            from client.app import app  # the installed distribution's ClientApp

            self._app = app
        return self._app

    def serve(self, token: str, fab_hash: str) -> TaskOutcome:
        start = time.perf_counter()
        client = runtime_client(self.settings, self.component, RuntimeTokenHttpInterceptor(token),
                                retries=task_retries())
        heartbeat = HeartbeatSender(lambda: _heartbeat(client))
        heartbeat.start()
        context: Context | None = None
        status, details = SubStatus.FAILED, "the hospital runtime failed on this task"
        try:
            message, context, fab = pull_task(client)
            announced = fab.hash_str if not fab_hash or fab.hash_str == fab_hash else "mismatch"
            reply, outcome = serve_task(message, context, announced, fab.content, self.app)
            push_message(client, reply, context)
            if outcome.served:
                status, details = SubStatus.COMPLETED, ""
            else:
                details = NOT_APPROVED
        finally:
            heartbeat.stop()
            push_task_output(client, context, status, details)
            client.close()
        if self._on_task is not None:
            self._on_task(outcome, time.perf_counter() - start)
        return outcome


def _heartbeat(client: RuntimeHttpClient) -> bool:
    """One task heartbeat; False (retried by :class:`HeartbeatSender`) when the SuperNode is unreachable."""
    try:
        response = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
    except httpx.HTTPError:
        return False
    if not response.success:
        log.warning("the SuperNode no longer knows the task in hand (stopped run?)")
    return True
