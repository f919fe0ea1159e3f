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

A deployed hospital must configure ``approved-apps`` and ``audit-log``; without them every task is refused.
"""

from __future__ import annotations

import hashlib
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
from flwr.proto.runtime_pb2 import (AcquireTaskRequest, PullAppMessagesRequest,  # pylint: disable=E0611
                                    PullTaskInputRequest, SendTaskHeartbeatRequest)
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (make_confirm_message_received_fn_protobuf,
                                                                 make_pull_object_fn_protobuf)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor,
                                         SuperExecAuthHttpInterceptor)
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from client.approval import APPROVED_APPS_KEY, find_approval, store_pending
from client.audit import REFUSED, AuditLog, message_entry
from client.guard import AUDIT_LOG_KEY
from shared.errors import RetuneError

log = logging.getLogger(__name__)
#: The Runtime API call a SuperExec signs with the shared secret (as Flower's SuperExec does).
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
#: What the server learns when a hospital refuses a run's app package (the detail stays at the hospital).
NOT_APPROVED = "this hospital has not approved the run's app package; its IT reviews it with `retune approve`"
NOT_CONFIGURED = "this hospital's runtime is not configured (approved list or audit log missing)"
#: Seconds to wait for a task's message to arrive whole from the SuperNode (Flower's default is two hours, which
#: a message whose transfer a restarting SuperLink cut off would hold this runtime for).
PULL_TIMEOUT = 120.0

App = Callable[[Message, Context], Message]


@dataclass(frozen=True)
class RuntimeSettings:
    """How the runtime reaches its SuperNode's Runtime API.

    Parameters
    ----------
    runtime_api : str
        ``host:port`` of the SuperNode's Runtime API (``flower-supernode --host/--port``, default 127.0.0.1:9094).
    secret : bytes
        The SuperExec shared secret (``--superexec-auth-secret-file`` of the SuperNode).
    root_certificates : str | None
        CA of the Runtime API's TLS certificate; None: plain HTTP on the hospital's internal network.
    poll_interval : float
        Seconds between task polls when idle (default 0.2).
    """

    runtime_api: str
    secret: bytes
    root_certificates: str | None = None
    poll_interval: float = 0.2


@dataclass(frozen=True)
class TaskOutcome:
    """What happened to one task: ``served`` (the app replied) or ``refused`` (and why, at the hospital)."""

    run_id: int
    message_type: str
    fab_hash: str
    served: bool
    detail: str = ""


def _retries() -> RetryInvoker:
    """Retry a task's calls through a short SuperNode outage (transport errors, 502/503/504) for up to a minute.

    Flower's own invoker is made for one-shot task processes: on a 401 it sends SIGINT to its own process, which
    would stop this long-lived runtime; here every other error ends the task in hand, never the runtime.
    """
    return RetryInvoker(lambda: exponential(max_delay=10), (httpx.TransportError, httpx.HTTPStatusError),
                        max_tries=None, max_time=60.0,
                        should_giveup=lambda exc: isinstance(exc, httpx.HTTPStatusError)
                        and exc.response.status_code not in (502, 503, 504))


def _client(settings: RuntimeSettings, *interceptors, retries: RetryInvoker | None = None) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=settings.runtime_api, insecure=settings.root_certificates is None,
        root_certificates=settings.root_certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), *interceptors],
        retry_invoker=retries)


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
    """Why the run's app package may not be served here (None: approved). Reads only the approved list."""
    approved, audit = context.node_config.get(APPROVED_APPS_KEY), context.node_config.get(AUDIT_LOG_KEY)
    if not approved or not audit:
        return f"node config lacks {APPROVED_APPS_KEY!r} or {AUDIT_LOG_KEY!r}: a deployed hospital needs both"
    if hashlib.sha256(fab_content).hexdigest() != fab_hash:
        return f"the app package's content does not match its hash {fab_hash[:16]}"
    if find_approval(Path(str(approved)), fab_hash) is None:
        pending = store_pending(Path(str(approved)), fab_content, fab_hash)
        return f"app package {fab_hash} is not in {approved}; kept for review at {pending}"
    return None


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
    configured = context.node_config.get(APPROVED_APPS_KEY) and context.node_config.get(AUDIT_LOG_KEY)
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


class HospitalRuntime:
    """Acquires the SuperNode's ClientApp tasks one at a time and serves each with :func:`serve_task`.

    ``app`` defaults to the installed :data:`client.app.app` (imported on first use, never from a run's package).
    """

    def __init__(self, settings: RuntimeSettings, app: App | None = None,
                 on_task: Callable[[TaskOutcome, float], None] | None = None) -> None:
        self.settings = settings
        self._app = app
        self._on_task = on_task
        self._acquirer = _client(settings, SuperExecAuthHttpInterceptor(master_secret=settings.secret,
                                                                        protected_methods={_ACQUIRE}))
        self._stopped = False

    @property
    def app(self) -> App:
        if self._app is None:
            from client.app import app  # the installed distribution's ClientApp

            self._app = app
        return self._app

    def stop(self) -> None:
        """Finish the task in hand, then return from :meth:`serve_forever`."""
        self._stopped = True

    def poll_once(self) -> TaskOutcome | None:
        """Acquire and serve at most one task; None when the SuperNode had none."""
        response = self._acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if not response.HasField("task") or not response.token:
            return None
        return self._run_task(response.token, response.task.fab_hash)

    def _run_task(self, token: str, announced_hash: str) -> TaskOutcome:
        start = time.perf_counter()
        client = _client(self.settings, RuntimeTokenHttpInterceptor(token), retries=_retries())
        heartbeat = HeartbeatSender(lambda: _heartbeat(client))
        heartbeat.start()
        context: Context | None = None
        status, details = SubStatus.FAILED, "the hospital runtime failed on this task"
        try:
            message, context, fab = pull_task(client)
            fab_hash = fab.hash_str if not announced_hash or fab.hash_str == announced_hash else "mismatch"
            reply, outcome = serve_task(message, context, fab_hash, fab.content, self.app)
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

    def serve_forever(self) -> None:
        """Serve tasks until :meth:`stop`; a SuperNode that is down is waited for, with a warning; a task that
        fails on the way (its run stopped, the SuperNode restarted) is logged and the next one served.

        Raises :class:`RetuneError` when the SuperNode refuses this runtime (a wrong SuperExec secret)."""
        unreachable_since: float | None = None
        while not self._stopped:
            try:
                outcome = self.poll_once()
            except httpx.HTTPStatusError as exc:
                if exc.request.url.path.endswith("/acquire-task") and exc.response.status_code in (401, 403):
                    raise RetuneError(f"the SuperNode at {self.settings.runtime_api} refused this runtime (HTTP "
                                      f"{exc.response.status_code}): --superexec-secret must hold the SuperNode's "
                                      "--superexec-auth-secret-file") from None
                log.warning("a task was abandoned: the SuperNode answered HTTP %d (%s)", exc.response.status_code,
                            exc.request.url.path)
                time.sleep(self.settings.poll_interval)
                continue
            except httpx.TransportError as exc:
                if unreachable_since is None:
                    unreachable_since = time.monotonic()
                    log.warning("the SuperNode's Runtime API at %s is unreachable (%s); retrying",
                                self.settings.runtime_api, exc)
                time.sleep(min(5.0, 0.5 + time.monotonic() - unreachable_since))
                continue
            except RuntimeError as exc:  # e.g. Flower's "no messages received" for a task cancelled meanwhile
                log.warning("a task was abandoned: %s", exc)
                continue
            except Exception:  # noqa: BLE001  a bug must not stop the hospital's site: log it, serve the next task
                log.exception("the hospital runtime failed on a task; serving the next one")
                continue
            if unreachable_since is not None:
                log.warning("the SuperNode at %s is reachable again", self.settings.runtime_api)
                unreachable_since = None
            if outcome is None:
                time.sleep(self.settings.poll_interval)

    def close(self) -> None:
        self._acquirer.close()


def _heartbeat(client: RuntimeHttpClient) -> bool:
    """One task heartbeat; False (retried by :class:`HeartbeatSender`) when the SuperNode is unreachable."""
    try:
        response = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
    except httpx.HTTPError:
        return False
    if not response.success:
        log.warning("the SuperNode no longer knows the task in hand (stopped run?)")
    return True
