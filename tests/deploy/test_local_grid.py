"""The in-process engine of ``retune simulate``: one message at a time per node, timeouts, errors."""

import threading
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from deploy.local_grid import FIRST_NODE_ID, LocalGrid

A, B = FIRST_NODE_ID, FIRST_NODE_ID + 1


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    for field, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)


def echo_app(log: list, gate: threading.Event) -> ClientApp:
    """Node A waits for ``gate`` on its first message; every app doubles the array and raises on ``config.fail``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        k = context.node_config["partition-id"]
        log.append((k, "start", int(msg.content["config"]["i"])))
        if k == 0 and int(msg.content["config"]["i"]) == 0:
            gate.wait(10)
        if msg.content["config"].get("fail"):
            raise RuntimeError(f"node {k} failed")
        values = msg.content["arrays"]["w"].numpy()
        values = 2 * values
        log.append((k, "end", int(msg.content["config"]["i"])))
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(values)})}), reply_to=msg)

    return app


def message(node: int, i: int, record: ArrayRecord, fail: bool = False) -> Message:
    return Message(RecordDict({"arrays": record, "config": ConfigRecord({"i": i, "fail": fail})}), node, "train",
                   group_id="1")


def test_a_slow_node_delays_only_itself_and_its_late_reply_is_dropped():
    log, gate = [], threading.Event()
    grid = LocalGrid(echo_app(log, gate), hospitals=2, run_id=7, workers=2)
    record = ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})
    start = time.monotonic()
    replies = list(grid.send_and_receive([message(A, 0, record), message(B, 1, record)], timeout=0.5))
    assert [r.metadata.src_node_id for r in replies] == [B]  # A missed the timeout
    # A's next message queues behind its first one; B, on the free worker, answers at once meanwhile
    queued = grid.push_messages([message(A, 2, record)])
    (quick,) = grid.send_and_receive([message(B, 3, record)], timeout=5)
    assert quick.metadata.src_node_id == B and time.monotonic() - start < 2
    assert (0, "start", 2) not in log
    gate.set()
    deadline = time.monotonic() + 10
    while not (late := list(grid.pull_messages(queued))) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert late and late[0].metadata.src_node_id == A
    assert log.index((0, "end", 0)) < log.index((0, "start", 2))  # one message at a time per node
    assert np.array_equal(late[0].content["arrays"]["w"].numpy(), 2 * np.ones(3))
    grid.close()


def test_an_app_exception_is_an_error_reply_naming_it():
    grid = LocalGrid(echo_app([], threading.Event()), hospitals=2, run_id=7, workers=1)
    record = ArrayRecord({"w": Array(np.ones(2, dtype=np.float32))})
    (reply,) = grid.send_and_receive([message(B, 1, record, fail=True)], timeout=5)
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason == "node 1 failed" and reply.metadata.src_node_id == B
    assert reply.metadata.reply_to_message_id  # answers the message sent
    with pytest.raises(ValueError, match="no simulated node"):
        grid.push_messages([message(FIRST_NODE_ID + 5, 1, record)])
    grid.close()
