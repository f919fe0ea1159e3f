"""Sending messages to hospitals and collecting their replies, without Flower's fixed 3-second polling."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

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
