"""The hospital boundary: hash-chained audit log, allow-list guard and consortium signature mod, run through
real Flower ClientApps called the way a SuperNode calls them (``app(message, context)``)."""

from __future__ import annotations

import json
import multiprocessing
import re
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client.approval import running_code
from client.audit import GENESIS, REFUSED, SENT, AuditLog, content_sha256, verify_log
from client.guard import (APP_FAILED, DECLINED_BUDGET, PUBLIC_REASONS, ROUND_REFUSED, SECAGG_ABORTED, UNSIGNED,
                          boundary_guard, hospital_mods, round_mod)
from shared.config import FederationConfig, run_identity
from shared.errors import RetuneError
from shared.secagg import SecAggError
from shared.model import RetuneModel
from shared.signing import ARRAYS_SIGNATURE, RoundBinding, arrays_digest, generate_keys, sign_round
from shared.wire import ARRAYS, ARRAYS_DIGEST, ARRAYS_NOT_HELD, CONFIG, METRICS, NUM_EXAMPLES, SITE, site_record, to_record

GLOBAL = to_record(RetuneModel(8))
SITE_RECORD = site_record("hospital-0", "0f" * 32)


CONFIG_OF = (lambda context: FederationConfig())  # noqa: E731  the run's settings as the hospital reads them
RUN = run_identity(FederationConfig().to_run_config())


def _message(kind: str = "train", arrays: ArrayRecord | None = GLOBAL, signature: bytes | None = None,
             stage: int = 1, round_: int = 2, run_id: int = 7) -> Message:
    config = ConfigRecord({"stage": stage, "round": round_, **({ARRAYS_SIGNATURE: signature} if signature else {})})
    content = RecordDict({CONFIG: config, **({ARRAYS: arrays} if arrays is not None else {})})
    meta = Metadata(run_id=run_id, message_id="msg-1", src_node_id=1, dst_node_id=42, reply_to_message_id="",
                    group_id="5", created_at=time.time(), ttl=600.0, message_type=kind)
    return Message(metadata=meta, content=content)


def _signed(private, kind: str = "train", arrays: ArrayRecord = GLOBAL, stage: int = 1, round_: int = 2,
            run: str = RUN, signed_kind: str | None = None, signed_run_id: int = 7) -> Message:
    """A message of Flower run 7 as the server sends it: the adaptors signed for a run, stage, round and kind."""
    binding = RoundBinding(signed_run_id, run, stage, round_, signed_kind or kind)
    return _message(kind, arrays, sign_round(arrays, binding, private), stage, round_, run_id=7)


def _context(**node_config: str) -> Context:
    return Context(run_id=7, node_id=42, node_config=dict(node_config), state=RecordDict(), run_config={})


def _app(mods, reply_fn, marker=None) -> ClientApp:
    """A ClientApp whose train and evaluate handlers answer with ``reply_fn(msg)`` (and touch ``marker``)."""
    app = ClientApp(mods=mods)

    def handler(msg: Message, context: Context) -> Message:
        if marker is not None:
            marker.write_text("the app ran")
        try:
            return Message(reply_fn(msg), reply_to=msg)
        except _Reply as whole:
            return whole.message

    app.train()(handler)
    app.evaluate()(handler)
    return app


class _Reply(Exception):
    """Lets a test's reply function answer with a whole message (an error reply, say)."""

    def __init__(self, message: Message) -> None:
        super().__init__("reply")
        self.message = message


def _train_reply(msg: Message) -> RecordDict:
    return RecordDict({ARRAYS: msg.content[ARRAYS], METRICS: MetricRecord({NUM_EXAMPLES: 12, "train-loss": 0.5}),
                       SITE: SITE_RECORD})


def _entries(path):
    return AuditLog(path).entries()


def test_audit_log_chains_and_verifies(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    written = [log.append({"event": SENT, "n": i}) for i in range(4)]
    assert written[0]["prev"] == GENESIS and all(b["prev"] == a["hash"] for a, b in zip(written, written[1:]))
    report = verify_log(log.path)
    assert report.ok and report.entries == 4 and report.head == written[-1]["hash"]
    assert verify_log(log.path, head=written[-1]["hash"]).ok


@pytest.mark.parametrize("tamper, bad_line", [("edit", 2), ("delete", 2), ("swap", 2), ("garble", 3),
                                              ("truncate", 4)])
def test_audit_log_reports_the_first_bad_line(tmp_path, tamper, bad_line):
    log = AuditLog(tmp_path / "audit.jsonl")
    head = [log.append({"event": SENT, "bytes": 100 * i}) for i in range(4)][-1]["hash"]
    lines = log.path.read_text().splitlines()
    if tamper == "edit":
        entry = json.loads(lines[1])
        entry["bytes"] = 0
        lines[1] = json.dumps(entry)
    elif tamper == "delete":
        del lines[1]
    elif tamper == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    elif tamper == "garble":
        lines[2] = lines[2][:-5]
    else:
        lines = lines[:3]
    log.path.write_text("\n".join(lines) + "\n")
    report = verify_log(log.path, head=head)
    assert not report.ok and report.bad_line == bad_line and report.problem
    if tamper == "truncate":
        assert verify_log(log.path).ok  # only the head hash kept elsewhere detects a cut-off end


def _writer(path: str, n: int, worker: int) -> None:
    log = AuditLog(path)
    for i in range(n):
        log.append({"event": SENT, "worker": worker, "i": i})


def test_concurrent_writers_keep_one_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_writer, args=(str(path), 15, w)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert all(w.exitcode == 0 for w in workers)
    report = verify_log(path)
    assert report.ok and report.entries == 60
    assert {(e["worker"], e["i"]) for e in _entries(path)} == {(w, i) for w in range(4) for i in range(15)}


def test_append_refuses_a_damaged_last_line(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append({"event": SENT})
    with log.path.open("a") as f:
        f.write('{"event": "sent", "hash": ')  # a torn write
    with pytest.raises(RetuneError, match="damaged"):
        log.append({"event": SENT})


def test_conforming_train_and_evaluate_replies_leave_and_are_audited(tmp_path):
    audit = tmp_path / "audit.jsonl"
    app = _app([boundary_guard(audit_path=audit)], _train_reply)
    reply = app(_message("train"), _context())
    assert reply.has_content() and list(reply.content[ARRAYS].keys()) == list(GLOBAL.keys())
    evaluate = _app([boundary_guard(audit_path=audit)], lambda m: RecordDict({METRICS: MetricRecord(
        {NUM_EXAMPLES: 3, "auroc/Edema": 0.7}), SITE: SITE_RECORD}))
    assert evaluate(_message("evaluate"), _context()).has_content()

    train_entry, eval_entry = _entries(audit)
    assert train_entry["event"] == SENT and train_entry["message_type"] == "train"
    assert (train_entry["run_id"], train_entry["server_round"], train_entry["stage"], train_entry["round"]) == \
        (7, 5, 1, 2)
    assert train_entry["records"] == [ARRAYS, METRICS, SITE]
    assert train_entry["arrays"] == {k: {"shape": list(a.shape), "dtype": a.dtype} for k, a in GLOBAL.items()}
    assert train_entry["metric_keys"] == [NUM_EXAMPLES, "train-loss"]
    assert train_entry["sha256"] == content_sha256(reply.content)
    assert train_entry["bytes"] >= sum(len(a.data) for a in GLOBAL.values())
    assert train_entry["code_hash"] == running_code().code_hash
    assert eval_entry["arrays"] == {} and eval_entry["metric_keys"] == ["auroc/Edema", NUM_EXAMPLES]
    assert verify_log(audit).ok


def _leaky(kind: str):
    def reply(msg: Message) -> RecordDict:
        content = _train_reply(msg)
        if kind == "extra_array":
            arrays = {k: np.array(a.numpy()) for k, a in msg.content[ARRAYS].items()}
            arrays["image_embeddings"] = np.ones((4, 8), np.float32)
            content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        elif kind == "extra_record":
            content["patients"] = ConfigRecord({"id": "patient-123"})
        elif kind == "string_metric":
            content[METRICS] = MetricRecord({NUM_EXAMPLES: 1, "leak": [0.1, 0.2]})
        elif kind == "dtype":
            content[ARRAYS] = ArrayRecord({k: Array(np.array(a.numpy(), np.float64))
                                           for k, a in msg.content[ARRAYS].items()})
        return content

    return reply


@pytest.mark.parametrize("kind", ["extra_array", "extra_record", "string_metric", "dtype"])
def test_non_conforming_train_reply_is_refused_and_logged(tmp_path, kind):
    audit = tmp_path / "audit.jsonl"
    reply = _app([boundary_guard(audit_path=audit)], _leaky(kind))(_message("train"), _context())
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert reply.metadata.reply_to_message_id == "msg-1"
    assert "patient" not in reply.error.reason and "embeddings" not in reply.error.reason
    (entry,) = _entries(audit)
    assert entry["event"] == REFUSED and entry["reason"]
    assert verify_log(audit).ok


def test_evaluate_reply_with_arrays_is_refused_and_the_audit_log_comes_from_node_config(tmp_path):
    audit = tmp_path / "node-audit.jsonl"
    reply = _app([boundary_guard()], _train_reply)(_message("evaluate"), _context(**{"audit-log": str(audit)}))
    assert reply.has_error()
    (entry,) = _entries(audit)
    assert entry["event"] == REFUSED and entry["arrays"] and "allowed" in entry["reason"]


@pytest.mark.parametrize("failure", ["exception", "secagg", "budget", "free-text error"])
def test_error_replies_leave_with_a_fixed_reason_and_the_detail_stays_in_the_audit_log(tmp_path, failure):
    """Whatever the app says or raises, the server gets a code and one of the fixed reasons: no path, no number
    from the ledger, no message text."""
    audit = tmp_path / "audit.jsonl"
    detail = ("privacy budget: this round would bring ε to 8.41 > the hospital's maximum 8 "
              "(δ=1e-05, ledger /srv/hospital/state/privacy-ledger.json); cannot read /data/patient-123/chest.dcm")

    def failing(msg):
        if failure == "exception":
            raise ValueError(detail)
        if failure == "secagg":
            raise SecAggError(detail)
        raise _Reply(Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                   f"{DECLINED_BUDGET}: {detail}" if failure == "budget" else detail), reply_to=msg))

    reply = _app([boundary_guard(audit_path=audit)], failing)(_message("train"), _context())
    assert reply.has_error() and reply.error.reason in PUBLIC_REASONS
    assert not re.search(r"\d|/", reply.error.reason)
    expected = {"exception": APP_FAILED, "secagg": SECAGG_ABORTED, "budget": DECLINED_BUDGET,
                "free-text error": APP_FAILED}[failure]
    assert reply.error.reason == expected
    (entry,) = _entries(audit)
    assert entry["event"] == "error" and "patient-123" in entry["reason"] and "8.41" in entry["reason"]


def test_guard_fails_closed_when_the_audit_log_is_unwritable(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    reply = _app([boundary_guard(audit_path=blocker / "audit.jsonl")], _train_reply)(_message("train"), _context())
    assert reply.has_error() and "audit log" in reply.error.reason


def test_train_message_without_global_adaptors_is_refused_before_the_app(tmp_path):
    marker = tmp_path / "ran"
    reply = _app([boundary_guard()], _train_reply, marker)(_message("train", arrays=None), _context())
    assert reply.has_error() and not marker.exists()


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    return generate_keys(tmp_path_factory.mktemp("keys"))


def test_round_mod_refuses_unsigned_or_altered_adaptors_before_the_app(tmp_path, consortium):
    private, public = consortium
    marker = tmp_path / "ran"
    app = _app([round_mod(CONFIG_OF, public)], _train_reply, marker)
    altered = ArrayRecord({k: Array(np.array(a.numpy()) * 2) for k, a in GLOBAL.items()})
    forged = _signed(private)
    forged.content[ARRAYS] = altered
    for msg in (_message("train"), forged, _message("train", GLOBAL, b"\0" * 64)):
        reply = app(msg, _context())
        assert reply.has_error() and reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
        assert reply.error.reason.startswith(UNSIGNED) and not marker.exists()
    assert app(_signed(private), _context()).has_content()
    assert marker.exists()


@pytest.mark.parametrize("replay", ["earlier round", "earlier stage", "same round other adaptors", "other run",
                                    "other run config", "evaluate signature on train", "round past the schedule",
                                    "stage past the schedule"])
def test_a_replayed_reordered_or_retargeted_round_is_refused(tmp_path, consortium, replay):
    """The server (or anyone holding an old signed message) cannot send a signed round again out of order, into
    another run or run config, as another kind of message, or past the run's stages × rounds (each extra round
    would be one more release of the hospital's updates)."""
    private, public = consortium
    marker = tmp_path / "ran"
    app = _app([round_mod(CONFIG_OF, public)], _train_reply, marker)
    context = _context()
    assert app(_signed(private, stage=1, round_=1), context).has_content()  # the run is at stage 2, round 2 (of 2 × 3)
    assert app(_signed(private, stage=1, round_=1), context).has_content()  # a retry: the same round, same adaptors
    other = ArrayRecord({k: Array(np.array(a.numpy()) + 1) for k, a in GLOBAL.items()})
    msg = {"earlier round": lambda: _signed(private, stage=1, round_=0),
           "earlier stage": lambda: _signed(private, stage=0, round_=2),
           "same round other adaptors": lambda: _signed(private, arrays=other, stage=1, round_=1),
           "other run": lambda: _signed(private, stage=1, round_=2, signed_run_id=8),
           "other run config": lambda: _signed(private, stage=1, round_=2, run="another-run-config"),
           "evaluate signature on train": lambda: _signed(private, stage=1, round_=2, signed_kind="evaluate"),
           "round past the schedule": lambda: _signed(private, stage=1, round_=3),
           "stage past the schedule": lambda: _signed(private, stage=2, round_=0)}[replay]()
    marker.unlink()
    reply = app(msg, context)
    assert reply.has_error() and not marker.exists()
    assert reply.error.reason.startswith(ROUND_REFUSED if "round" in replay or "stage" in replay or "adaptors"
                                         in replay else UNSIGNED), reply.error.reason
    assert app(_signed(private, stage=1, round_=2), context).has_content()  # the next round goes through


def test_hospital_mods_from_node_config(tmp_path, consortium):
    private, public = consortium
    audit = tmp_path / "audit.jsonl"
    context = _context(**{"audit-log": str(audit), "consortium-key": str(public)})
    app = _app(hospital_mods(CONFIG_OF), _train_reply)
    assert app(_signed(private), context).has_content()
    assert app(_message("train"), context).has_error()  # unsigned: refused by the signature mod ...
    events = [(e["event"], e.get("error_code")) for e in _entries(audit)]
    assert events == [(SENT, None), ("error", ErrorCode.MOD_FAILED_PRECONDITION)]  # ... and audited by the guard
    assert verify_log(audit).ok
    # no consortium key in the node config: nothing can be verified, so nothing is trained on (it used to pass
    # unchecked)
    for msg in (_message("train"), _signed(private)):
        refused = app(msg, _context())
        assert refused.has_error() and refused.error.reason.startswith(UNSIGNED)


def _naming(message: Message) -> Message:
    """``message`` as the server sends it to a hospital that holds its adaptors: their digest instead of them."""
    content = RecordDict({CONFIG: ConfigRecord({**dict(message.content[CONFIG].items()),
                                                ARRAYS_DIGEST: arrays_digest(message.content[ARRAYS]).hex()})})
    return Message(metadata=message.metadata, content=content)


def test_adaptors_named_by_digest_are_the_held_ones_and_verified_as_if_sent(tmp_path, consortium):
    """A hospital keeps the last adaptors it verified; a message may name them instead of carrying them. What it
    names is verified exactly as if it had come: a signature for other adaptors, run or kind is refused, and
    adaptors it does not hold are asked for (with a fixed reason), never made up."""
    private, public = consortium
    audit = tmp_path / "audit.jsonl"
    seen: list[ArrayRecord] = []

    def train_reply(msg: Message) -> RecordDict:
        seen.append(msg.content[ARRAYS])
        if msg.metadata.message_type == "evaluate":
            return RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 12}), SITE: SITE_RECORD})
        return _train_reply(msg)

    app = _app(hospital_mods(CONFIG_OF, audit, public), train_reply)
    context = _context()
    first = app(_signed(private, "evaluate", stage=1, round_=0), context)
    assert first.has_content()
    light = _naming(_signed(private, "train", stage=1, round_=1))
    assert ARRAYS not in light.content
    reply = app(light, context)
    assert reply.has_content() and arrays_digest(seen[-1]) == arrays_digest(GLOBAL)
    assert arrays_digest(reply.content[ARRAYS]) == arrays_digest(GLOBAL)  # the reply is checked against them too
    other = ArrayRecord({k: Array(np.array(a.numpy()) + 1) for k, a in GLOBAL.items()})
    calls = len(seen)
    for bad in (_naming(_signed(private, "train", arrays=other, stage=1, round_=2)),  # not held
                _naming(_signed(private, "train", stage=1, round_=2, signed_kind="evaluate")),  # other kind
                _naming(_signed(private, "train", stage=1, round_=2, signed_run_id=8))):  # other run
        refused = app(bad, context)
        assert refused.has_error() and refused.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    fresh = app(_naming(_signed(private, "train", stage=1, round_=1)), _context())  # a fresh hospital holds nothing
    assert fresh.has_error() and fresh.error.reason == ARRAYS_NOT_HELD
    assert len(seen) == calls  # the app never ran on any of them
    reasons = [e["reason"] for e in _entries(audit) if e["event"] == "error"]
    assert reasons[0] == f"the message names global adaptors {arrays_digest(other).hex()[:12]}… that this " \
                         "hospital does not hold"  # the detail stays in the audit log
    assert reasons[1].startswith(UNSIGNED) and reasons[2].startswith(UNSIGNED)
    assert verify_log(audit).ok
