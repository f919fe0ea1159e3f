"""A long-lived process that acquires Flower tasks from a Runtime API and serves them with installed code only.

Flower's ``flower-superexec`` starts a fresh ``flwr-clientapp`` or ``flwr-serverapp`` process per task, which unpacks
the run's app package (FAB) and imports it: whoever submits a run decides the code that runs. Both parties of a
retune-fl federation replace it by a runtime of their own that takes the same tasks through the same Runtime API
(authenticated with the SuperExec secret, as Flower's SuperExec does), checks the package's hash against its approved
list, and serves approved runs with the installed retune-fl: the hospital's (:mod:`client.runtime`) and the
consortium's, the only holder of the signing key (:mod:`server.runtime`). This module is what they share: how to
reach the Runtime API, and the loop that serves tasks until stopped.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient

from shared.errors import RetuneError

log = logging.getLogger(__name__)
#: The Runtime API call a SuperExec signs with the shared secret (as Flower's SuperExec does).
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"


@dataclass(frozen=True)
class RuntimeSettings:
    """How a runtime reaches its Runtime API.

    Parameters
    ----------
    runtime_api : str
        ``host:port`` of the Runtime API (a hospital's SuperNode: ``flower-supernode --host/--port``, default
        127.0.0.1:9094; the consortium's SuperLink: its ``--port``).
    secret : bytes
        The SuperExec shared secret (``--superexec-auth-secret-file`` of the SuperNode or SuperLink).
    root_certificates : str | None
        CA of the Runtime API's TLS certificate; None: plain HTTP on an internal network.
    poll_interval : float
        Seconds between task polls when idle (default 0.2).
    """

    runtime_api: str
    secret: bytes
    root_certificates: str | None = None
    poll_interval: float = 0.2


def read_secret(path: Path) -> bytes:
    """The SuperExec secret a runtime shares with its SuperNode or SuperLink."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise RetuneError(f"cannot read the SuperExec secret {path}: {exc.strerror}") from None


def task_retries() -> RetryInvoker:
    """Retry a task's calls through a short outage (transport errors, 502/503/504) for up to a minute.

    Flower's own invoker is made for one-shot task processes: on a 401 it sends SIGINT to its own process, which
    would stop a long-lived runtime; here every other error ends the task in hand, never the runtime.
    """
    return RetryInvoker(lambda: exponential(max_delay=10), (httpx.TransportError, httpx.HTTPStatusError),
                        max_tries=None, max_time=60.0,
                        should_giveup=lambda exc: isinstance(exc, httpx.HTTPStatusError)
                        and exc.response.status_code not in (502, 503, 504))


def runtime_client(settings: RuntimeSettings, component: str, *interceptors,
                   retries: RetryInvoker | None = None) -> RuntimeHttpClient:
    """A Runtime API client that presents itself as Flower's ``component`` (``flwr-clientapp``/``flwr-serverapp``)."""
    return RuntimeHttpClient.from_server_address(
        server_address=settings.runtime_api, insecure=settings.root_certificates is None,
        root_certificates=settings.root_certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name=component), *interceptors],
        retry_invoker=retries)


class TaskRuntime:
    """Acquires tasks of ``task_type`` one at a time and serves each with :meth:`serve` (subclasses)."""

    component: str = ""
    task_type: str = ""
    peer: str = "the Runtime API"

    def __init__(self, settings: RuntimeSettings) -> None:
        self.settings = settings
        self._acquirer = runtime_client(settings, self.component, SuperExecAuthHttpInterceptor(
            master_secret=settings.secret, protected_methods={_ACQUIRE}))
        self._stopped = False

    def serve(self, token: str, fab_hash: str) -> object:
        """Serve one acquired task (its Runtime API token and announced app-package hash)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Finish the task in hand, then return from :meth:`serve_forever`."""
        self._stopped = True

    def poll_once(self) -> object | None:
        """Acquire and serve at most one task; None when there was none."""
        response = self._acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[self.task_type]))
        if not response.HasField("task") or not response.token:
            return None
        return self.serve(response.token, response.task.fab_hash)

    def serve_forever(self) -> None:
        """Serve tasks until :meth:`stop`; a Runtime API that is down is waited for, with a warning; a task that
        fails on the way (its run stopped, the peer restarted) is logged and the next one served.

        Raises :class:`RetuneError` when the Runtime API refuses this runtime (a wrong SuperExec secret)."""
        unreachable_since: float | None = None
        while not self._stopped:
            try:
                outcome = self.poll_once()
            except httpx.HTTPStatusError as exc:
                if exc.request.url.path.endswith("/acquire-task") and exc.response.status_code in (401, 403):
                    raise RetuneError(f"{self.peer} at {self.settings.runtime_api} refused this runtime (HTTP "
                                      f"{exc.response.status_code}): --superexec-secret must hold its "
                                      "--superexec-auth-secret-file") from None
                log.warning("a task was abandoned: %s answered HTTP %d (%s)", self.peer, exc.response.status_code,
                            exc.request.url.path)
                time.sleep(self.settings.poll_interval)
                continue
            except httpx.TransportError as exc:
                if unreachable_since is None:
                    unreachable_since = time.monotonic()
                    log.warning("%s at %s is unreachable (%s); retrying", self.peer, self.settings.runtime_api, exc)
                time.sleep(min(5.0, 0.5 + time.monotonic() - unreachable_since))
                continue
            except RuntimeError as exc:  # e.g. Flower's "no messages received" for a task cancelled meanwhile
                log.warning("a task was abandoned: %s", exc)
                continue
            except Exception:  # noqa: BLE001  a bug must not stop the site: log it, serve the next task
                log.exception("the runtime failed on a task; serving the next one")
                continue
            if unreachable_since is not None:
                log.warning("%s at %s is reachable again", self.peer, self.settings.runtime_api)
                unreachable_since = None
            if outcome is None:
                time.sleep(self.settings.poll_interval)

    def close(self) -> None:
        self._acquirer.close()

    def serve_until_signalled(self) -> None:
        """:meth:`serve_forever` until SIGTERM or SIGINT (the task in hand is finished first), then :meth:`close`."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
        try:
            self.serve_forever()
        finally:
            self.close()
