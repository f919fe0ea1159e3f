"""The round loop against hospitals that go missing, refuse, or run another backbone: a round counts only with
``min-hospitals`` updates, a run that cannot go on fails loudly, and hospitals are named by their node config."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from client.guard import HELD_KEY, restore_held
from server.federation import run_federation, wait_for_hospitals
from server.hospitals import FederationError, Hospitals
from server.state import STATE, RunState
from shared.config import FederationConfig
from shared.wire import ARRAYS, ARRAYS_NOT_HELD, METRICS, NUM_EXAMPLES, SITE, encoded, payload_bytes, site_record

DIM = 8
BACKBONE, OTHER = "aa" * 32, "bb" * 32
#: A hospital: (incoming message, round number so far) -> its reply, or None to stay silent.
Behaviour = Callable[[Message, int], Message | None]


def honest(name: str, backbone: str = BACKBONE, scale: float = 1.0) -> Behaviour:
    def reply(msg: Message, _round: int) -> Message:
        metrics = {NUM_EXAMPLES: 10, "train-loss": 0.5}
        content = RecordDict({METRICS: MetricRecord(metrics), SITE: site_record(name, backbone)})
        if msg.metadata.message_type == "train":
            content[ARRAYS] = ArrayRecord({k: Array((a.numpy() * scale).astype(a.dtype))  # as it came
                                           for k, a in msg.content[ARRAYS].items()})
        else:
            content[METRICS] = MetricRecord({NUM_EXAMPLES: 10, "auroc/all/Edema": 0.7, "pos/all/Edema": 3,
                                             "neg/all/Edema": 7, "auroc/s0/Edema": 0.7, "pos/s0/Edema": 3,
                                             "neg/s0/Edema": 7})
        return Message(content, reply_to=msg)
    return reply


def refusing(msg: Message, _round: int) -> Message:
    return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, "this hospital has not approved the run's app package"),
                   reply_to=msg)


def silent(msg: Message, _round: int) -> None:
    return None


class Grid:
    """Delivers each message to its hospital's behaviour at once; ``connected`` can be changed by a test. Each
    hospital keeps the adaptors of the last message it answered, as the hospital's guard does, and ``sent`` counts
    the messages that carried adaptors."""

    def __init__(self, hospitals: dict[int, Behaviour]) -> None:
        self.hospitals, self.connected = hospitals, set(hospitals)
        self.outbox: dict[str, Message] = {}
        self.trains = 0
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
                         for node in hospitals}
        self.sent = 0

    def get_node_ids(self):
        return sorted(self.connected)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.trains += msg.metadata.message_type == "train"
            meta = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=node,
                            reply_to_message_id="", group_id=msg.metadata.group_id, created_at=time.time(),
                            ttl=600.0, message_type=msg.metadata.message_type)
            incoming = Message(metadata=meta, content=RecordDict(dict(msg.content.items())))
            self.sent += ARRAYS in incoming.content
            if (missing := restore_held(incoming, self.contexts[node])) is not None:
                reply = Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, f"{ARRAYS_NOT_HELD}: {missing}"),
                                reply_to=incoming)
            else:
                reply = self.hospitals[node](incoming, self.trains)
            if reply is not None and not reply.has_error():
                self.contexts[node].state[HELD_KEY] = incoming.content[ARRAYS]
            if reply is not None:
                self.outbox[meta.message_id] = reply
            ids.append(meta.message_id)
        return ids

    def pull_messages(self, ids):
        return [self.outbox.pop(i) for i in list(ids) if i in self.outbox]


def _config(tmp_path, **kwargs) -> FederationConfig:
    settings = dict(stages=1, rounds_per_stage=2, min_hospitals=2, round_timeout=0.5, join_timeout=2.0,
                    round_retries=1, diseases="Edema", run_dir=str(tmp_path / "run"))
    return FederationConfig(**{**settings, **kwargs})


def test_rounds_name_hospitals_and_record_the_backbone(tmp_path):
    grid = Grid({11: honest("st-mary"), 22: honest("royal-free"), 33: silent})
    state = run_federation(grid, _config(tmp_path), DIM)
    first = state.history[0]
    assert first["clients"] == 2 and set(first["bytes_up_per_hospital"]) == {"st-mary", "royal-free"}
    assert set(first["hospitals"]) == {"st-mary", "royal-free"}
    assert first["declined"] == [{"hospital": "node-33", "reason": "no reply within round-timeout (0.5 s)",
                                  "phase": phase} for phase in ("train", "evaluate")]
    saved = json.loads((tmp_path / "run" / STATE).read_text())
    assert saved["backbone"] == BACKBONE and saved["hospitals"] == {"11": "st-mary", "22": "royal-free"}


def test_a_hospital_on_another_backbone_is_refused_by_name(tmp_path):
    grid = Grid({1: honest("h-a"), 2: honest("h-b"), 3: honest("h-c", OTHER, scale=100.0)})
    state = run_federation(grid, _config(tmp_path), DIM)
    record = state.history[0]
    assert record["clients"] == 2 and "h-c" not in record["bytes_up_per_hospital"]
    assert [r["hospital"] for r in record["refused"]] == ["h-c", "h-c"]  # its train and its evaluate replies
    assert "backbone" in record["refused"][0]["reason"]
    for name, array in state.arrays.items():  # the ×100 update of the other backbone is not in the average
        assert np.abs(array.numpy()).max() < 10
        assert array.dtype == "float32" and array.numpy().dtype == np.float32, name  # the adaptors' own dtype


def test_a_pinned_identity_wins_and_a_tie_stops_the_run(tmp_path):
    grid = Grid({1: honest("h-a"), 2: honest("h-b", OTHER), 3: honest("h-c", OTHER)})
    state = run_federation(grid, _config(tmp_path / "pinned", backbone_identity=BACKBONE, min_hospitals=1), DIM)
    assert state.history[0]["clients"] == 1 and state.backbone == BACKBONE
    tie = Grid({1: honest("h-a"), 2: honest("h-b", OTHER)})
    with pytest.raises(FederationError, match="disagree on the backbone.*h-a.*h-b"):
        run_federation(tie, _config(tmp_path / "tie"), DIM)


def test_a_round_with_too_few_updates_is_retried_then_the_run_fails_without_counting_it(tmp_path, caplog):
    grid = Grid({1: honest("h-a"), 2: refusing, 3: silent})
    with caplog.at_level(logging.WARNING), pytest.raises(FederationError, match="fewer than min-hospitals 2.*2 times"):
        run_federation(grid, _config(tmp_path), DIM)
    assert "the round does not count; trying it again" in caplog.text
    assert "not approved" in caplog.text and "no reply within round-timeout" in caplog.text
    assert grid.trains == 2 * 3  # the first round, twice, to three hospitals
    assert not (tmp_path / "run" / STATE).exists()  # nothing was committed


def test_a_round_that_recovers_on_retry_counts_once(tmp_path):
    flaky = honest("h-b")
    grid = Grid({1: honest("h-a"), 2: lambda msg, n: flaky(msg, n) if n > 2 else None})
    state = run_federation(grid, _config(tmp_path, round_retries=2), DIM)
    assert [r["attempts"] for r in state.history] == [2, 1]
    assert [r["clients"] for r in state.history] == [2, 2] and state.server_round == 2


def test_too_few_connected_hospitals_wait_and_then_fail_loudly(tmp_path, caplog):
    grid = Grid({1: honest("h-a"), 2: honest("h-b")})
    grid.connected = {1}
    start = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(FederationError, match="only 1 of the 2 hospitals"):
        wait_for_hospitals(grid, _config(tmp_path, join_timeout=1.5))
    assert time.monotonic() - start >= 1.5
    assert "waiting for hospitals: 1 of the 2" in caplog.text


def test_names_learnt_earlier_name_later_errors_and_duplicates_are_told_apart():
    hospitals = Hospitals(BACKBONE, {5: "h-a", 6: "h-a"})
    assert hospitals.name_of(5) == "h-a (node 5)" and hospitals.name_of(7) == "node-7"


def test_resume_keeps_names_and_identity(tmp_path):
    config = _config(tmp_path, rounds_per_stage=3)
    state = RunState.open(config, ArrayRecord())
    state.commit(ArrayRecord(), {}, {"macro_auroc": 0.5}, BACKBONE, {4: "h-a"})
    resumed = RunState.open(config, ArrayRecord())
    assert resumed.backbone == BACKBONE and resumed.hospitals == {4: "h-a"}


def bad_evaluate(name: str, problem: str) -> Behaviour:
    """An honest trainer whose evaluate replies are broken: no metrics, an AUROC out of range, or no counts."""
    train = honest(name)

    def reply(msg: Message, round_: int) -> Message:
        answer = train(msg, round_)
        if msg.metadata.message_type == "evaluate":
            metrics = dict(answer.content[METRICS])
            if problem == "no metrics":
                del answer.content[METRICS]
                return answer
            if problem == "auroc 1.5":
                metrics["auroc/all/Edema"] = 1.5
            if problem == "no counts":
                del metrics["pos/all/Edema"]
            answer.content[METRICS] = MetricRecord(metrics)
        return answer

    return reply


@pytest.mark.parametrize("problem, reason", [("no metrics", "reply records"), ("auroc 1.5", "not an AUROC in [0, 1]"),
                                             ("no counts", "without a whole, non-negative 'pos/all/Edema'")])
def test_a_malformed_evaluate_reply_is_refused_by_name_and_the_run_goes_on(tmp_path, problem, reason):
    grid = Grid({11: honest("st-mary"), 22: honest("royal-free"), 33: bad_evaluate("mallory", problem)})
    state = run_federation(grid, _config(tmp_path), DIM)
    assert state.done and all(r["clients"] == 3 for r in state.history)
    for record in state.history:
        assert set(record["hospitals"]) == {"st-mary", "royal-free"}
        assert [(e["hospital"], e["phase"]) for e in record["refused"]] == [("mallory", "evaluate")]
        assert reason in record["refused"][0]["reason"]
        assert record["macro_auroc"] == pytest.approx(0.7)


@pytest.mark.parametrize("wire_dtype, itemsize", [("float16", 2), ("float32", 4)])
def test_adaptors_cross_in_the_wire_dtype_and_never_twice_to_a_hospital(tmp_path, wire_dtype, itemsize):
    """Round r's evaluate message and round r+1's train message hold the same global adaptors: a hospital that
    answered the first gets the second without them. Every byte count is the wire dtype's."""
    grid = Grid({1: honest("h-a", scale=1.5), 2: honest("h-b", scale=0.75)})  # every round moves the adaptors
    state = run_federation(grid, _config(tmp_path, rounds_per_stage=3, wire_dtype=wire_dtype), DIM)
    assert grid.sent == 2 * 4  # train and evaluate of round 1, evaluate of rounds 2 and 3: 4 per hospital, not 6
    size = payload_bytes(encoded(state.arrays, wire_dtype))  # npy bytes, headers included
    assert size == sum(a.numpy().size for a in state.arrays.values()) * itemsize + 128 * len(state.arrays)
    assert [r["bytes_down"] for r in state.history] == [4 * size, 2 * size, 2 * size]
    assert all(r["bytes_up_per_hospital"] == {"h-a": size, "h-b": size} for r in state.history)
    assert all(a.dtype == "float32" for a in state.arrays.values())  # decoded before aggregation, kept in float32


def test_a_hospital_that_lost_its_adaptors_asks_and_gets_them_in_the_same_round(tmp_path):
    grid = Grid({1: honest("h-a", scale=1.5), 2: honest("h-b", scale=0.75)})
    original, trains = grid.push_messages, []

    def push(messages):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            trains.append(messages)
            if len(trains) == 2:  # hospital h-b's SuperNode restarted before round 2: what it held is gone
                grid.contexts[2].state = RecordDict()
        return original(messages)

    grid.push_messages = push
    state = run_federation(grid, _config(tmp_path, rounds_per_stage=2), DIM)
    assert [r["clients"] for r in state.history] == [2, 2] and not state.history[1]["declined"]
    size = payload_bytes(encoded(state.arrays, "float16"))
    assert state.history[1]["bytes_down"] == 3 * size  # h-b's train message again, in full; both evaluates
    assert [len(m) for m in trains] == [2, 2, 1] and ARRAYS not in trains[1][1].content  # asked, then sent
