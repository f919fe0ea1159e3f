"""Sending messages to hospitals and collecting their replies, without Flower's fixed 3-second polling, and
without sending a hospital global adaptors it already holds."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from shared.wire import ARRAYS, ARRAYS_NOT_HELD

#: Seconds between pulls while replies are outstanding (Flower's ``send_and_receive`` waits 3 s): the first
#: pause is FIRST_POLL, each next one 1.5 × longer up to POLL_INTERVAL, so polling never holds a quick round up.
FIRST_POLL = 0.002
POLL_INTERVAL = 0.2


def exchange(grid: Grid, messages: Iterable[Message], timeout: float | None) -> dict[int, Message]:
    """Push ``messages`` and return, by destination node, the replies that arrive within ``timeout`` seconds (None:
    all of them), as ``grid.send_and_receive`` does, polling from every :data:`FIRST_POLL` up to every
    :data:`POLL_INTERVAL` seconds.

    Keyed by the node a message went to: an error the SuperLink answers for a node that went away (e.g. its
    heartbeats stopped) carries the SuperLink as its sender, not the node. A node that sent nothing is absent.
    """
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    node_of = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages) if mid}
    pending = set(node_of)
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    replies: dict[int, Message] = {}
    pause = FIRST_POLL
    while pending:
        for reply in grid.pull_messages(pending):
            mid = reply.metadata.reply_to_message_id
            if mid in pending:
                replies[node_of[mid]] = reply
                pending.discard(mid)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(1.5 * pause, POLL_INTERVAL)
    return replies


class HeldArrays:
    """Which global adaptors (by digest) each hospital holds: those of the last message it answered without an
    error, which it verified and kept (:func:`client.guard.round_mod`). A message whose adaptors the hospital holds
    goes without them (its config names their digest, :data:`shared.wire.ARRAYS_DIGEST`; the hospital verifies the
    message's signature over the adaptors it puts back); a hospital that no longer holds them answers
    :data:`shared.wire.ARRAYS_NOT_HELD` and gets them in full (:meth:`resend`, after the first exchange)."""

    def __init__(self) -> None:
        self._held: dict[int, str] = {}

    def lighten(self, messages: list[Message], digest: str) -> list[Message]:
        """``messages`` (all carrying the adaptors of ``digest``), without them for the nodes that hold them."""
        for message in messages:
            if self._held.get(message.metadata.dst_node_id) == digest:
                del message.content[ARRAYS]
        return messages

    def record(self, replies: dict[int, Message], digest: str) -> None:
        """After an exchange of adaptors ``digest``: who answered holds them; who failed may not."""
        for node, reply in replies.items():
            if reply.has_error():
                self._held.pop(node, None)
            else:
                self._held[node] = digest

    def resend(self, grid: Grid, messages: list[Message], arrays: ArrayRecord, replies: dict[int, Message],
               timeout: float | None) -> tuple[dict[int, Message], int]:
        """Send ``messages`` again, with ``arrays``, to the nodes whose reply asked for them; ``replies`` with the
        new answers, and how many were sent."""
        asked = {node for node, r in replies.items() if r.has_error() and r.error.reason.startswith(ARRAYS_NOT_HELD)}
        again = [Message(RecordDict({**dict(m.content.items()), ARRAYS: arrays}), dst_node_id=m.metadata.dst_node_id,
                         message_type=m.metadata.message_type, group_id=m.metadata.group_id)
                 for m in messages if m.metadata.dst_node_id in asked]
        return ({**replies, **exchange(grid, again, timeout)} if again else replies), len(again)
