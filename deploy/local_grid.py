"""``retune simulate``'s engine: the ServerApp and every simulated hospital's ClientApp in one process.

:class:`LocalGrid` is a Flower :class:`~flwr.serverapp.Grid` whose nodes are ClientApps called in threads of this
process. The apps are the ones a deployment runs, entered through Flower's own ``ServerApp``/``ClientApp`` call
(mods included); every message and reply crosses as Flower's protobuf bytes, what a SuperLink would carry, so
what cannot cross a real link fails here too. A node handles one message at a time, as a SuperNode
does; a reply that misses ``send_and_receive``'s timeout is dropped (its node stays busy until its app returns; one
that a caller pulling on its own stops waiting for stays until pulled, as on a SuperLink until its TTL), and an
exception in an app becomes an error reply naming it. What this leaves out is process isolation between hospitals,
which a simulation on synthetic data has no use for: Flower's simulation engine starts Ray and a worker pool for it
(≈ 30 s before the first round on 2 cores) and carries each message through an actor.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

#: Simulated node ids: hospital k is ``FIRST_NODE_ID + k`` (Flower's SuperLink is node 1).
FIRST_NODE_ID = 1 << 32


def over_the_wire(message: Message) -> Message:
    """The message as its receiver gets it: through Flower's protobuf serialisation."""
    return message_from_proto(ProtoMessage.FromString(message_to_proto(message).SerializeToString()))


class LocalGrid(Grid):
    """Nodes ``FIRST_NODE_ID + k`` (k < ``hospitals``), each running ``client_app`` with node config
    ``partition-id = k``; ``workers`` threads run apps concurrently, one message per node at a time (a node's
    next message waits in its queue, not in a worker)."""

    def __init__(self, client_app: ClientApp, hospitals: int, run_id: int, workers: int) -> None:
        self._run = Run.create_empty(run_id)
        self._app = client_app
        self._contexts = {
            FIRST_NODE_ID + k: Context(run_id=run_id, node_id=FIRST_NODE_ID + k, state=RecordDict(), run_config={},
                                       node_config={PARTITION_ID_KEY: k, NUM_PARTITIONS_KEY: hospitals})
            for k in range(hospitals)}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hospital")
        self._done = threading.Condition()
        self._queues: dict[int, deque[tuple[str, Message]]] = {node: deque() for node in self._contexts}
        self._running: set[int] = set()
        self._awaited: set[str] = set()
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count(1)  # message ids: unique within the grid, cheaper than uuid4 per message

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in self._contexts:
                raise ValueError(f"no simulated node {node}")
            message.metadata.__dict__["_message_id"] = message_id = f"{next(self._ids):032x}"
            delivered = over_the_wire(message)
            with self._done:
                self._awaited.add(message_id)
                self._queues[node].append((message_id, delivered))
                if node not in self._running:
                    self._next(node)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._done:
            return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        with self._done:
            self._done.wait_for(lambda: all(i in self._replies for i in ids), timeout)
            self._awaited.difference_update(ids)  # past the timeout: dropped, as a SuperLink drops expired ones
            return [self._replies.pop(i) for i in ids if i in self._replies]

    def _next(self, node: int) -> None:
        """Hand ``node``'s next queued message to a worker (the caller holds ``_done``)."""
        self._running.add(node)
        self._pool.submit(self._deliver, node, *self._queues[node].popleft())

    def _deliver(self, node: int, message_id: str, message: Message) -> None:
        try:
            reply = self._app(message, self._contexts[node])
            reply.metadata.__dict__["_message_id"] = f"r{message_id}"
            reply = over_the_wire(reply)
        except Exception as exc:  # as Flower reports a ClientApp's exception: an error reply, the node lives on
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)), reply_to=message)
            reply.metadata.__dict__["_message_id"] = f"r{message_id}"
        with self._done:
            if message_id in self._awaited:
                self._replies[message_id] = reply
            self._done.notify_all()
            if self._queues[node]:
                self._next(node)
            else:
                self._running.discard(node)

    def close(self) -> None:
        """Stop taking messages; apps still running finish in their threads, their replies unread."""
        self._pool.shutdown(wait=False, cancel_futures=True)


@contextmanager
def _single_threaded_ops() -> Iterator[None]:
    """Simulated hospitals share this machine's cores: each runs its torch ops on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_local(server_app: ServerApp, client_app: ClientApp, hospitals: int, workers: int, run_id: int = 1) -> None:
    """Run ``server_app`` to its end against ``hospitals`` simulated nodes, in this process."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    grid = LocalGrid(client_app, hospitals, run_id, workers)
    try:
        with _single_threaded_ops():
            server_app(grid, Context(run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                                     run_config={}))
    finally:
        grid.close()
