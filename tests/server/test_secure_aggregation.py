"""Secure aggregation end to end: the server's five stages (:mod:`server.secagg`) against hospitals running
:mod:`client.secagg`, through Flower's simulation engine and through an in-process grid for the drop-out cases.

What the tests show: what the server receives from each hospital is uniform on Z/2^64 and uncorrelated with its
update; the unmasked aggregate is the example-weighted FedAvg within :data:`shared.secagg.QUANTISATION_ERROR`
(plus float32 rounding); a hospital dropping out after sharing keys (before its masked vector) or a survivor going
silent at unmask still lets the round complete with the others' sum; too many drop-outs yield no aggregate; and a
hospital refuses a server that breaks the protocol's rules: substituted or unsigned keys, a sybil outside the roster,
a second setup or a second masked vector for a round (also across Flower runs), fewer than three hospitals.
"""

from __future__ import annotations

import tempfile
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid, ServerApp

from client.secagg import STATE_KEY, register_secure_handlers
from deploy.redteam.attacks_secagg import negative_zero
from shared.config import run_identity
from server.secagg import SecureRound, secure_round, secure_train
from server.strategy import make_strategy
from shared.config import FederationConfig
from shared.model import RetuneModel
from shared.secagg import EXTRAS, PROTOCOL, QUANTISATION_ERROR, SecAggError, Layout, encode_update
from shared.wire import (ARRAYS, CONFIG, MASKED, METRICS, NUM_EXAMPLES, SECAGG, SECAGG_CONSISTENCY, SECAGG_MASKED,
                         SECAGG_UNMASK, SITE, adaptor_spec, site_record, to_record)

GLOBAL = to_record(RetuneModel(16))
NEXT = ArrayRecord({name: Array(array.numpy() + np.float32(0.25)) for name, array in GLOBAL.items()})
BACKBONE = "ef" * 32
SPEC = adaptor_spec(RetuneModel(16))
CONFIG_OF = (lambda context: FederationConfig(secure_aggregation=True))  # noqa: E731
RUN = run_identity(FederationConfig(secure_aggregation=True).to_run_config())


def identities(folder: Path, hospitals: int) -> dict[int, dict[str, str]]:
    """Per partition, the node config of a consortium member: its name, its identity key and the shared roster."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from shared.identity import Roster

    folder.mkdir(parents=True, exist_ok=True)
    configs, publics = {}, {}
    for k in range(hospitals):
        key = Ed25519PrivateKey.generate()
        (folder / f"hospital-{k}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        (folder / f"hospital-{k}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
        publics[f"hospital-{k}"] = folder / f"hospital-{k}.pub"
        configs[k] = {"name": f"hospital-{k}", "secagg-key": str(folder / f"hospital-{k}.key"),
                      "roster": str(folder / "roster.json")}
    Roster.write(folder / "roster.json", publics)
    return configs


# --- trivial hospitals: a synthetic update per partition, and a switch to fail at one stage --------------------


def update_of(partition: int, arrays: ArrayRecord) -> tuple[dict[str, np.ndarray], int, float]:
    """Hospital ``partition``'s "trained" adaptors, example count and loss (deterministic, varied magnitudes)."""
    out = {}
    for name, array in arrays.items():
        rng = np.random.default_rng([partition, zlib.crc32(name.encode())])
        scale = 10.0 ** rng.uniform(-3, 1)
        out[name] = (array.numpy() + scale * rng.standard_normal(array.shape)).astype(np.float32)
    return out, 17 * (partition + 1) + 3 * partition ** 2, 0.25 + 0.1 * partition


def synthetic_train(msg: Message, context: Context) -> Message:
    """A trivial train handler; ``fail-round`` in the node config makes it raise in that round (a hospital that
    shared its keys and then goes down before sending its masked vector)."""
    partition = int(context.node_config["partition-id"])
    if int(context.node_config.get("fail-round", -1)) == int(msg.content[CONFIG]["round"]):
        raise RuntimeError(f"hospital-{partition} went down mid-round")
    arrays, n, loss = update_of(partition, msg.content[ARRAYS])
    content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          METRICS: MetricRecord({NUM_EXAMPLES: n, "train-loss": loss, "partition-id": partition}),
                          SITE: site_record(f"hospital-{partition}", BACKBONE)})
    return Message(content, reply_to=msg)


def trained(train):
    """A train handler as the secure stages take it: the reply, and the digest of the stage data it trained on
    (here: the round's, so that rounds from the same adaptors are different updates)."""
    return lambda msg, context: (train(msg, context), f"data-of-round-{msg.content[CONFIG]['round']}")


def hospital_app() -> ClientApp:
    app = ClientApp()
    register_secure_handlers(app, trained(synthetic_train))
    return app


def train_content(round_: int, arrays: ArrayRecord = GLOBAL) -> RecordDict:
    return RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({"stage": 0, "round": round_})})


def fedavg(partitions: list[int], arrays: ArrayRecord = GLOBAL) -> tuple[dict[str, np.ndarray], int, float]:
    """Plain example-weighted FedAvg of those hospitals' updates, in float64."""
    updates = [update_of(p, arrays) for p in partitions]
    total = sum(n for _, n, _ in updates)
    avg = {k: sum(u[k].astype(np.float64) * n for u, n, _ in updates) / total for k in arrays}
    return avg, total, sum(loss * n for _, n, loss in updates) / total


def assert_is_fedavg(result: SecureRound, partitions: list[int], arrays: ArrayRecord = GLOBAL) -> None:
    expected, total, loss = fedavg(partitions, arrays)
    assert result.failure is None and result.arrays is not None
    assert result.num_examples == total and int(result.metrics[NUM_EXAMPLES]) == total
    assert abs(float(result.metrics["train-loss"]) - loss) <= QUANTISATION_ERROR
    assert int(result.metrics["clipped"]) == 0
    worst = 0.0
    for name, value in expected.items():
        got = result.arrays[name].numpy()
        assert got.dtype == np.float32 and got.shape == value.shape
        # quantisation bound, plus half an ulp for storing the average as float32
        bound = QUANTISATION_ERROR + np.abs(value) * 2.0 ** -24
        error = np.abs(got.astype(np.float64) - value)
        assert np.all(error <= bound), name
        worst = max(worst, float(np.max(error)))
    assert worst > 0  # it is a real quantised computation, not a copy


def masked_vector(reply: Message) -> np.ndarray:
    record = reply.content[MASKED]
    layout = Layout.of({name: s.shape for name, s in SPEC.items()})
    return layout.join({name: array.numpy() for name, array in record.items()})


def plain_vector(partition: int) -> np.ndarray:
    arrays, n, loss = update_of(partition, GLOBAL)
    layout = Layout.of({name: s.shape for name, s in SPEC.items()})
    return encode_update(layout, arrays, n, loss)


def looks_uniform(y: np.ndarray) -> bool:
    """Kolmogorov-Smirnov against U(0, 2^64) and every bit a fair coin (6σ: false alarms below 1e-6)."""
    n = len(y)
    bits = (y[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    return bool(stats.kstest(y.astype(np.float64) / 2.0 ** 64, "uniform").pvalue > 1e-6
                and np.all(np.abs(bits.mean(axis=0) - 0.5) < 6 * 0.5 / np.sqrt(n)))


def assert_looks_nothing_like_its_update(reply: Message, partition: int) -> None:
    """The masked vector is uniform on Z/2^64 and uncorrelated with the hospital's update (whose own encoding is
    anything but uniform)."""
    assert set(reply.content.keys()) == {MASKED, METRICS, SITE} and ARRAYS not in reply.content
    assert set(reply.content[METRICS].keys()) <= {"partition-id", "epsilon", "delta"}
    y, x = masked_vector(reply), plain_vector(partition)
    assert looks_uniform(y) and not looks_uniform(x)
    n = len(y)
    weights = np.concatenate([update_of(partition, GLOBAL)[0][k].ravel() for k in sorted(SPEC)])
    assert abs(np.corrcoef(y[len(EXTRAS):].astype(np.float64), weights)[0, 1]) < 6 / np.sqrt(n)
    assert abs(np.corrcoef(y.view(np.int64).astype(np.float64), x.view(np.int64).astype(np.float64))[0, 1]) \
        < 6 / np.sqrt(n)


# --- an in-process grid: each node a ClientApp call with its own Context, messages serialised both ways ---------


def _wire(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


class LocalGrid:
    """What ``grid.send_and_receive`` does, in-process: deliver (serialised), run the node's ClientApp with its
    persistent Context, turn an exception into an error reply, serialise the reply back. ``silent`` nodes never
    answer messages of the given stages."""

    def __init__(self, app: ClientApp, hospitals: int, fail_round: dict[int, int] | None = None,
                 silent: dict[int, set[str]] | None = None, members: dict[int, dict[str, str]] | None = None,
                 extra: dict[str, str] | None = None) -> None:
        self.app, self.silent = app, silent or {}
        members = members or identities(Path(tempfile.mkdtemp(prefix="roster-")), hospitals)
        self.contexts = {1000 + 7 * k: Context(run_id=1, node_id=1000 + 7 * k, node_config={
            "partition-id": k, **members[k], **(extra or {}),
            **({"fail-round": fail_round[k]} if k in (fail_round or {}) else {})},
            state=RecordDict(), run_config={}) for k in range(hospitals)}
        self.partition = {node: k for k, node in enumerate(self.contexts)}
        self.received: list[tuple[str, int, Message]] = []  # (message type, node, reply) as the server got it
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def deliver(self, msg: Message) -> Message:
        meta = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=msg.metadata.dst_node_id,
                        reply_to_message_id="", group_id=msg.metadata.group_id, created_at=time.time(), ttl=600.0,
                        message_type=msg.metadata.message_type)
        return Message(metadata=meta, content=_wire(msg.content))

    def push_messages(self, messages):
        """Deliver each message now; its id is its reply's ``reply_to`` (a silent node's gets one never answered)."""
        ids, self.outbox = [], {}
        for msg in messages:
            replies = list(self.send_and_receive([msg]))
            ids.append(replies[0].metadata.reply_to_message_id if replies else uuid.uuid4().hex)
            self.outbox.update({r.metadata.reply_to_message_id: r for r in replies})
        return ids

    def pull_messages(self, message_ids):
        return [self.outbox.pop(mid) for mid in list(message_ids) if mid in self.outbox]

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            stage = msg.metadata.message_type.split(".")[1]
            if stage in self.silent.get(self.partition[node], set()):
                continue
            incoming = self.deliver(msg)
            try:
                reply = self.app(incoming, self.contexts[node])
            except Exception as exc:  # noqa: BLE001  what a SuperNode reports for a failing ClientApp
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, repr(exc)), reply_to=incoming)
            if not reply.has_error():
                reply = Message(metadata=reply.metadata, content=_wire(reply.content))
            self.received.append((msg.metadata.message_type, node, reply))
            replies.append(reply)
        return replies


def _run(grid: LocalGrid, round_: int = 1) -> SecureRound:
    return secure_round(grid, grid.get_node_ids(), train_content(round_), round_, timeout=1)  # replies are instant


# --- through Flower's simulation engine -------------------------------------------------------------------------


def test_simulation_masks_every_update_and_survives_a_dropout(tmp_path):
    """Three hospitals in Flower's simulation engine: round 1 with all, round 2 with hospital 2 failing after it
    shared its keys (its ClientApp raises at the masked-vector stage)."""
    from flwr.simulation import run_simulation

    results: dict[int, SecureRound] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        while len(nodes := list(grid.get_node_ids())) < 3:
            time.sleep(0.1)
        for round_ in (1, 2):  # round 2 from the new global adaptors, as a federation goes on
            results[round_] = secure_round(grid, nodes, train_content(round_, NEXT if round_ == 2 else GLOBAL),
                                           round_, timeout=120)

    members = identities(tmp_path / "roster", 3)

    def member(msg: Message, context: Context, call_next):  # what each simulated SuperNode's node config holds
        context.node_config.update(members[int(context.node_config["partition-id"])])
        context.node_config["secagg-max-colluders"] = 0  # three that survive a drop-out trust each other not to collude
        return call_next(msg, context)

    hospitals = ClientApp(mods=[member])
    register_secure_handlers(hospitals, trained(_train_failing_in_round_2))
    start = time.perf_counter()
    run_simulation(server_app=server, client_app=hospitals, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    elapsed = time.perf_counter() - start
    assert set(results) == {1, 2}, f"the ServerApp did not finish ({elapsed:.0f} s)"

    first, second = results[1], results[2]
    assert_is_fedavg(first, [0, 1, 2])
    assert len(first.accepted) == 3 and not first.dropped and not first.declined
    for reply in first.accepted:
        partition = int(reply.content[METRICS]["partition-id"])
        assert_looks_nothing_like_its_update(reply, partition)
        assert first.masked_bytes[reply.metadata.src_node_id] > 8 * Layout.of(
            {n: s.shape for n, s in SPEC.items()}).size
        assert first.bytes_up[reply.metadata.src_node_id] > first.masked_bytes[reply.metadata.src_node_id]

    assert_is_fedavg(second, [0, 1], NEXT)
    assert len(second.accepted) == 2 and len(second.dropped) == 1
    assert [int(r.content[METRICS]["partition-id"]) for r in second.accepted] == [0, 1]
    assert len(second.declined) == 1 and second.declined[0].metadata.src_node_id == second.dropped[0]


def _train_failing_in_round_2(msg: Message, context: Context) -> Message:
    if int(context.node_config["partition-id"]) == 2 and int(msg.content[CONFIG]["round"]) == 2:
        raise RuntimeError("hospital-2 went down mid-round")
    return synthetic_train(msg, context)


# --- in-process: drop-outs at every stage, failures, refusals ---------------------------------------------------


#: Three hospitals that tolerate a drop-out after key sharing assume no peer colludes with the server: with one
#: colluder allowed (the default), a survivor set must be signed by all three (more than (3 + 1) / 2).
TRUSTING = {"secagg-max-colluders": 0}


def test_a_drop_out_among_three_needs_hospitals_that_assume_no_colluder():
    assert _run(LocalGrid(hospital_app(), hospitals=3, fail_round={1: 1})).arrays is None
    assert _run(LocalGrid(hospital_app(), hospitals=3, fail_round={1: 1}, extra=TRUSTING)).arrays is not None
    assert _run(LocalGrid(hospital_app(), hospitals=4, fail_round={1: 1})).arrays is not None  # 3 of 4 > (4 + 1) / 2


def test_aggregate_is_fedavg_and_each_vector_is_masked():
    grid = LocalGrid(hospital_app(), hospitals=4)
    result = _run(grid)
    assert_is_fedavg(result, [0, 1, 2, 3])
    for reply in result.accepted:
        assert_looks_nothing_like_its_update(reply, int(reply.content[METRICS]["partition-id"]))
    # the secrets are gone once a hospital has answered the unmask request
    assert all(STATE_KEY not in context.state for context in grid.contexts.values())


def test_a_hospital_failing_after_key_sharing_is_unmasked_out_of_the_sum():
    grid = LocalGrid(hospital_app(), hospitals=3, fail_round={1: 1}, extra=TRUSTING)
    result = _run(grid)
    assert_is_fedavg(result, [0, 2])
    node = [n for n, k in grid.partition.items() if k == 1]
    assert result.dropped == node and [m.metadata.src_node_id for m in result.declined] == node
    assert "went down" in result.declined[0].error.reason
    # survivors were asked for the dropped hospital's key shares, and only for those
    unmask = [r for t, _, r in grid.received if t.endswith(SECAGG_UNMASK)]
    assert len(unmask) == 2 and all(len(r.content[SECAGG]["key-shares"]) == 1 for r in unmask)


def test_drop_outs_at_every_stage():
    """Eight hospitals: one silent at setup (7 share keys: threshold 4), one silent at key sharing, one fails at its
    masked vector, one survivor silent at unmask; the round completes with the sum of the five survivors."""
    grid = LocalGrid(hospital_app(), hospitals=8, fail_round={3: 1},
                     silent={0: {"secagg_setup"}, 1: {"secagg_share_keys"}, 4: {SECAGG_UNMASK}})
    result = _run(grid)
    assert_is_fedavg(result, [2, 4, 5, 6, 7])
    assert sorted(grid.partition[n] for n in result.dropped) == [3]
    assert sorted(grid.partition[m.metadata.src_node_id] for m in result.declined) == [0, 1, 3]


def test_a_silent_survivor_too_many_fails_the_round():
    """Five hospitals (threshold 3): one fails at its masked vector, then two of the four survivors go silent at
    unmask: two shares per secret are not enough, and the server gets no aggregate (nor any single update)."""
    grid = LocalGrid(hospital_app(), hospitals=5, fail_round={3: 1}, silent={0: {SECAGG_UNMASK}, 4: {SECAGG_UNMASK}})
    result = _run(grid)
    assert result.arrays is None and "3 needed" in result.failure


def test_too_many_drop_outs_yield_no_aggregate():
    grid = LocalGrid(hospital_app(), hospitals=3, fail_round={0: 1, 1: 1})
    result = _run(grid)
    assert result.arrays is None and "fewer than the threshold" in result.failure
    assert not result.accepted


def test_secure_train_feeds_the_strategy_one_weighted_reply():
    """FedAvg keeps the secure average; FedAdam takes its server step from it as from plain FedAvg."""
    for name in ("fedavg", "fedprox", "fedadam"):
        # updates of up to 10 × N(0, 1) per coordinate: no containment, which the secure sum cannot apply either
        config = FederationConfig(strategy=name, min_hospitals=3, server_lr=0.05, max_update_norm=0,
                                  max_weight_ratio=0, wire_dtype="float32")  # the same numbers on both paths
        secure, plain = make_strategy(config, SPEC), make_strategy(config, SPEC)
        grid = LocalGrid(hospital_app(), hospitals=3)
        train_msgs = list(secure.configure_train(1, GLOBAL, ConfigRecord({"stage": 0, "round": 1}), grid))
        arrays, metrics, outcome = secure_train(grid, secure, 1, train_msgs, timeout=10)
        plain_msgs = list(plain.configure_train(1, GLOBAL, ConfigRecord({"stage": 0, "round": 1}), grid))
        replies = [synthetic_train(grid.deliver(m), grid.contexts[m.metadata.dst_node_id]) for m in plain_msgs]
        expected, expected_metrics = plain.aggregate_train(1, replies)
        assert outcome.num_examples == fedavg([0, 1, 2])[1]
        assert float(metrics["train-loss"]) == pytest.approx(float(expected_metrics["train-loss"]), abs=1e-6)
        assert set(arrays.keys()) == set(expected.keys()) == set(SPEC)
        for key in SPEC:  # the adaptors' own dtype on both paths (FedAdam's server step is computed in float64)
            assert arrays[key].dtype == expected[key].dtype == "float32", (name, key)
            assert arrays[key].numpy().dtype == expected[key].numpy().dtype == np.float32, (name, key)
            np.testing.assert_allclose(arrays[key].numpy(), expected[key].numpy(), rtol=0, atol=1e-5)
        if name == "fedadam":
            assert secure.optimizer_state() and not np.allclose(arrays[key].numpy(), outcome.arrays[key].numpy())


# --- a hospital refuses a server that breaks the rules ----------------------------------------------------------


def _through_masked(hospitals: int = 3) -> tuple[LocalGrid, dict[int, Message]]:
    """Run setup, share keys and masked vectors honestly; return the grid and the unmask messages the server
    would send next (captured, not delivered)."""
    grid = LocalGrid(hospital_app(), hospitals=hospitals)
    captured: dict[int, Message] = {}
    real = grid.send_and_receive

    def capture(messages, timeout=None):
        if messages and messages[0].metadata.message_type.endswith(SECAGG_UNMASK):
            captured.update({m.metadata.dst_node_id: m for m in messages})
            return []
        return real(messages, timeout)

    grid.send_and_receive = capture
    _run(grid)
    grid.send_and_receive = real
    return grid, captured


def _ask(grid: LocalGrid, template: Message, **fields) -> Message:
    record = dict(template.content[SECAGG].items())
    record.update({k: v for k, v in fields.items() if v is not None})
    for k in [k for k, v in fields.items() if v is None]:
        record.pop(k, None)
    msg = Message(RecordDict({SECAGG: ConfigRecord(record)}), dst_node_id=template.metadata.dst_node_id,
                  message_type=template.metadata.message_type, group_id=template.metadata.group_id)
    return grid.app(grid.deliver(msg), grid.contexts[msg.metadata.dst_node_id])


def test_a_hospital_answers_one_unmask_request_per_round():
    grid, unmask = _through_masked()
    template = next(iter(unmask.values()))
    _ask(grid, template)
    with pytest.raises(SecAggError, match="without a secure-aggregation round"):
        _ask(grid, template, dropped=[template.content[SECAGG]["survivors"][0]])


def test_a_session_is_set_up_once_and_survivor_signatures_bind_its_transcript():
    """A server cannot set a hospital up twice under one session id (it would hold the hospital's signatures of two
    survivor sets for one session), and a survivor-set signature counts only for the key sharing it was given in:
    signatures by the same hospitals over the same set but another session's transcript open nothing."""
    from shared.identity import load_identity, session_transcript, sign, survivors_view

    grid, unmask = _through_masked()
    node, template = next(iter(unmask.items()))
    setup = next(m for m in grid.sent if m.metadata.dst_node_id == node and m.metadata.message_type.endswith(
        "secagg_setup"))
    state = dict(grid.contexts[node].state[STATE_KEY].items())
    survivors = list(template.content[SECAGG]["survivors"])
    other = session_transcript(PROTOCOL, 7, bytes(16), list(state["position"]), list(state["indices"]),
                               list(state["names"]), list(state["pk1s"]), list(state["pk2s"]), state["threshold"])
    assert other != state["transcript"]
    keys = {k + 1: load_identity(grid.contexts[n].node_config["secagg-key"])  # as the server numbers them
            for k, n in enumerate(sorted(grid.contexts))}
    forged = [sign(keys[i], survivors_view(other, survivors, [])) for i in template.content[SECAGG]["signers"]]
    with pytest.raises(SecAggError, match="inconsistent survivor sets"):
        _ask(grid, template, signatures=forged)
    _ask(grid, template)  # the signatures it was given, over its own transcript, open the round
    with pytest.raises(SecAggError, match="session this hospital set up before"):
        grid.app(grid.deliver(setup), grid.contexts[node])


def test_a_hospital_masks_once_per_round():
    """A second masked-vector request in the same round (say, for other adaptors) is refused: two vectors under the
    same masks would give away the difference of two updates."""
    grid, _ = _through_masked()
    node = next(iter(grid.contexts))
    msg = next(m for m in grid.sent if m.metadata.dst_node_id == node and m.metadata.message_type.endswith(
        SECAGG_MASKED))
    with pytest.raises(SecAggError, match="out of order"):
        grid.app(grid.deliver(msg), grid.contexts[node])


def test_a_hospital_never_reveals_both_shares_of_one_peer():
    grid, unmask = _through_masked()
    node, template = next(iter(unmask.items()))
    survivors = list(template.content[SECAGG]["survivors"])
    with pytest.raises(SecAggError, match="both survivor and dropped"):
        _ask(grid, template, dropped=[survivors[-1]])
    me = grid.contexts[node].state[STATE_KEY]["index"]
    other = [i for i in survivors if i != me]
    with pytest.raises(SecAggError, match="do not match"):
        _ask(grid, template, survivors=[me, other[0]], dropped=None)  # a peer missing from both lists
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        _ask(grid, template, survivors=[me], dropped=other)


def test_a_hospital_refuses_a_minority_threshold_and_foreign_keys():
    grid = LocalGrid(hospital_app(), hospitals=5)
    captured = {}
    real = grid.send_and_receive

    def capture(messages, timeout=None):
        if messages and messages[0].metadata.message_type.endswith("secagg_share_keys"):
            captured.update({m.metadata.dst_node_id: m for m in messages})
            return []
        return real(messages, timeout)

    grid.send_and_receive = capture
    assert _run(grid).arrays is None
    template = next(iter(captured.values()))
    with pytest.raises(SecAggError, match="strict majority"):
        _ask(grid, template, threshold=2)
    pk1 = list(template.content[SECAGG]["pk1"])
    pk1[0], pk1[1] = pk1[1], pk1[0]
    with pytest.raises(SecAggError, match="own announcement|repeated"):
        _ask(grid, template, pk1=pk1)


def test_a_plain_update_never_leaves_and_the_wire_check_holds():
    """The masked reply passes the secure allow-list and the plain train allow-list refuses it, and vice versa."""
    from shared.wire import WireError, check_reply, check_secure_reply

    grid = LocalGrid(hospital_app(), hospitals=3)
    result = _run(grid)
    assert result.failure is None
    for reply in result.accepted:
        check_secure_reply(reply.content, SECAGG_MASKED, SPEC)
        with pytest.raises(WireError):
            check_reply(reply.content, SPEC)
        sneaky = RecordDict({**dict(reply.content.items()), ARRAYS: GLOBAL})
        with pytest.raises(WireError):
            check_secure_reply(sneaky, SECAGG_MASKED, SPEC)
    for kind, node, reply in grid.received:
        assert ARRAYS not in reply.content and NUM_EXAMPLES not in reply.content.get(METRICS, {})


# --- inside the hospital boundary (guard, audit log, consortium signature) -------------------------------------


def test_the_hospital_boundary_passes_and_audits_the_secure_stages(tmp_path):
    """With the hospital's own mods around the handlers: every secure reply passes the boundary guard and is
    audited (masked vector included, no plain arrays), and the masked-vector stage still needs signed adaptors."""
    from client.audit import SENT, AuditLog, verify_log
    from client.guard import hospital_mods
    from shared.signing import ARRAYS_SIGNATURE, PRIVATE_KEY, PUBLIC_KEY, RoundBinding, generate_keys, sign_round

    generate_keys(tmp_path / "keys")
    audit = tmp_path / "audit.jsonl"
    app = ClientApp(mods=hospital_mods(CONFIG_OF, audit_path=audit, public_key=tmp_path / "keys" / PUBLIC_KEY))
    register_secure_handlers(app, trained(synthetic_train))
    grid = LocalGrid(app, hospitals=3)
    signed = train_content(1)
    signed[CONFIG][ARRAYS_SIGNATURE] = sign_round(GLOBAL, RoundBinding(1, RUN, 0, 1, "train"),
                                                  tmp_path / "keys" / PRIVATE_KEY)
    result = secure_round(grid, grid.get_node_ids(), signed, 1, timeout=10)
    assert_is_fedavg(result, [0, 1, 2])
    assert verify_log(audit).ok
    entries = AuditLog(audit).entries()
    assert len(entries) == 3 * 5 and {e["event"] for e in entries} == {SENT}
    for entry in entries:
        assert "arrays" not in entry["records"]
        if entry["message_type"].endswith(SECAGG_MASKED):
            assert entry["records"] == [MASKED, METRICS, SITE] and entry["metric_keys"] == ["partition-id"]
            assert {spec["dtype"] for spec in entry["arrays"].values()} == {"uint64"}
    unsigned = secure_round(grid, grid.get_node_ids(), train_content(2), 2, timeout=10)
    assert unsigned.arrays is None and all("not signed" in m.error.reason for m in unsigned.declined)


# --- a malicious server --------------------------------------------------------------------------------------------


class TamperingGrid(LocalGrid):
    """A server that rewrites its share-keys broadcast before delivering it (``tamper(record)`` edits it)."""

    def __init__(self, *args, tamper, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tamper = tamper

    def send_and_receive(self, messages, timeout=None):
        if messages and messages[0].metadata.message_type.endswith("secagg_share_keys"):
            changed = []
            for msg in messages:
                record = dict(msg.content[SECAGG].items())
                self.tamper(record)
                changed.append(Message(RecordDict({SECAGG: ConfigRecord(record)}), dst_node_id=msg.metadata.dst_node_id,
                                       message_type=msg.metadata.message_type, group_id=msg.metadata.group_id))
            messages = changed
        return super().send_and_receive(messages, timeout)


def _guarded_app(tmp_path: Path) -> ClientApp:
    """A hospital with its boundary guard: what leaves on an abort is the fixed reason, the detail is audited."""
    from client.guard import boundary_guard

    app = ClientApp(mods=[boundary_guard(audit_path=tmp_path / "audit.jsonl")])
    register_secure_handlers(app, trained(synthetic_train))
    return app


def _server_keys() -> tuple[bytes, bytes]:
    from shared.secagg import new_key_pair

    return new_key_pair()[1], new_key_pair()[1]


@pytest.mark.parametrize("attack", ["substitute a peer's keys", "drop the signatures", "a sybil outside the roster",
                                    "a member listed twice"])
def test_a_server_that_forges_the_key_exchange_makes_every_honest_hospital_abort(tmp_path, attack):
    from client.guard import SECAGG_ABORTED

    def tamper(record):
        pk1, pk2, names, signatures = (list(record[k]) for k in ("pk1", "pk2", "names", "signatures"))
        if attack == "substitute a peer's keys":  # the server's own keys under hospital-1's name and signature
            pk1[1], pk2[1] = _server_keys()
        elif attack == "drop the signatures":
            signatures = [b"\0" * 64] * len(signatures)
        elif attack == "a sybil outside the roster":
            names[2] = "hospital-9"
        else:
            names[2] = names[1]
        record.update(pk1=pk1, pk2=pk2, names=names, signatures=signatures)

    grid = TamperingGrid(_guarded_app(tmp_path), hospitals=4, tamper=tamper)
    result = _run(grid)
    assert result.arrays is None and not result.accepted  # no shares were encrypted for anyone
    assert len(result.declined) == 4 and all(m.error.reason == SECAGG_ABORTED for m in result.declined)
    assert sorted(result.names.values()) == [f"hospital-{k}" for k in range(4)]  # the report can name them
    shares = [r for kind, _, r in grid.received if kind.endswith("secagg_share_keys") and not r.has_error()]
    assert not shares


@pytest.mark.parametrize("start", ["same adaptors", "a -0.0 for a 0.0"])
def test_an_update_is_never_summed_with_another_set_of_hospitals_under_any_run(tmp_path, start):
    """The rerun-and-subtract attack: a round with all four hospitals, then the same round (same global adaptors, or
    the same written with a -0.0 for a 0.0; same stage data: without DP the same updates) without hospital 3, under a
    new Flower run and run identity, and subtract the sums. Each hospital remembers beside its audit log with whom it
    let each update be summed (by where it started and by the update itself), and signs no other survivor set for
    it: no second sum. Asking the same hospitals again (a server restarted mid-round) still completes, with the
    same sum."""
    members = identities(tmp_path / "roster", 4)
    audit = {"audit-log": str(tmp_path / "a.jsonl")}
    first = LocalGrid(hospital_app(), hospitals=4, members=members, extra=audit)
    summed = _run(first)
    assert_is_fedavg(summed, [0, 1, 2, 3])
    without = LocalGrid(hospital_app(), hospitals=4, members=members, extra=audit)  # a fresh Flower run
    nodes = [n for n, k in without.partition.items() if k != 3]
    arrays = GLOBAL if start == "same adaptors" else negative_zero(GLOBAL)
    rerun = secure_round(without, nodes, train_content(1, arrays), 1, timeout=1)
    assert rerun.arrays is None and not rerun.accepted
    refusals = [r.error.reason for kind, _, r in without.received if kind.endswith(SECAGG_CONSISTENCY)]
    assert len(refusals) == 3 and all("summed with" in reason for reason in refusals)
    assert not [r for kind, _, r in without.received if kind.endswith(SECAGG_UNMASK)]  # not one share revealed
    again = LocalGrid(hospital_app(), hospitals=4, members=members, extra=audit)
    resumed = _run(again)  # the same four, the same round: a resumption completes, with the same sum
    assert_is_fedavg(resumed, [0, 1, 2, 3])
    for name in resumed.arrays.keys():
        assert np.array_equal(resumed.arrays[name].numpy(), summed.arrays[name].numpy())
    assert _run(first, round_=2).arrays is not None  # another update (the next round) is summed as usual


def test_a_retried_round_asks_exactly_the_hospitals_that_signed_their_survivor_set(tmp_path):
    """A round whose survivors signed their set, but that then failed (two survivors silent at unmask): those
    hospitals' updates may only be summed with each other, so a retry with everyone (the one that dropped out is
    back) is refused, and the retry the server makes, with exactly the set that was signed, completes."""
    members = identities(tmp_path / "roster", 4)
    audit = {"audit-log": str(tmp_path / "a.jsonl")}
    first = LocalGrid(hospital_app(), hospitals=4, members=members, extra=audit, fail_round={3: 1},
                      silent={0: {SECAGG_UNMASK}, 1: {SECAGG_UNMASK}})
    failed = _run(first)
    assert failed.arrays is None and "needed" in failed.failure
    assert sorted(first.partition[n] for n in failed.agreed) == [0, 1, 2]
    everyone = LocalGrid(hospital_app(), hospitals=4, members=members, extra=audit)
    assert _run(everyone).arrays is None
    again = LocalGrid(hospital_app(), hospitals=4, members=members, extra=audit)
    retried = secure_round(again, [n for n, k in again.partition.items() if k != 3], train_content(1), 1, timeout=1)
    assert_is_fedavg(retried, [0, 1, 2])


class ViewsGrid(LocalGrid):
    """A server that shows each hospital its own survivor set at the consistency and unmask stages (``views``:
    partition → (survivor partitions, dropped partitions)), with a colluding peer (``colluder``: partition) that signs
    every set: at unmask each hospital gets the signatures over its own set, its own and the colluder's."""

    def __init__(self, *args, views, colluder: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.views, self.colluder = views, colluder
        self.signed: dict[int, bytes] = {}

    def send_and_receive(self, messages, timeout=None):
        from shared.identity import load_identity, sign, survivors_view

        stage = messages[0].metadata.message_type.split(".")[1] if messages else ""
        if stage not in (SECAGG_CONSISTENCY, SECAGG_UNMASK):
            return super().send_and_receive(messages, timeout)
        index = {node: k + 1 for k, node in enumerate(sorted(self.contexts))}  # as the server numbers them
        node_of = {self.partition[n]: n for n in self.contexts}
        colluder_key = load_identity(self.contexts[node_of[self.colluder]].node_config["secagg-key"])
        changed = []
        for msg in messages:
            partition = self.partition[msg.metadata.dst_node_id]
            survivors, dropped = (sorted(index[node_of[k]] for k in ks) for ks in self.views[partition])
            record = {**dict(msg.content[SECAGG].items()), "survivors": survivors}
            record.pop("dropped", None)
            if dropped:
                record["dropped"] = dropped
            if stage == SECAGG_UNMASK:  # the colluder signs whatever set, for the key sharing it took part in
                transcript = self.contexts[node_of[self.colluder]].state[STATE_KEY]["transcript"]
                view = survivors_view(transcript, survivors, dropped)
                record["signers"] = [index[msg.metadata.dst_node_id], index[node_of[self.colluder]]]
                record["signatures"] = [self.signed[partition], sign(colluder_key, view)]
            changed.append(Message(RecordDict({SECAGG: ConfigRecord(record)}), dst_node_id=msg.metadata.dst_node_id,
                                   message_type=msg.metadata.message_type, group_id=msg.metadata.group_id))
        replies = super().send_and_receive(changed, timeout)
        if stage == SECAGG_CONSISTENCY:
            self.signed.update({self.partition[r.metadata.src_node_id]: r.content[SECAGG]["signature"]
                                for r in replies if not r.has_error()})
        return replies


def test_survivor_sets_that_differ_between_hospitals_make_them_abort_before_any_share():
    """The inconsistent-views attack (n = 3, t = 2): hospital 0 is told {0, 2} survived and 1 dropped; hospital 1 is
    told {1, 2} survived and 0 dropped (2 colludes). Each view is signed by two hospitals only, below the quorum
    of more than (3 + 1) / 2: neither honest hospital reveals a share, and each names the round."""
    grid = ViewsGrid(hospital_app(), hospitals=3, views={0: ([0, 2], [1]), 1: ([1, 2], [0]), 2: ([0, 1, 2], [])},
                     colluder=2)
    result = _run(grid)
    assert result.arrays is None
    unmask = {grid.partition[n]: r for kind, n, r in grid.received if kind.endswith(SECAGG_UNMASK)}
    for partition in (0, 1):
        assert unmask[partition].has_error()
        assert "stage 1 round 2" in unmask[partition].error.reason and "inconsistent" in unmask[partition].error.reason


def test_secure_aggregation_needs_three_hospitals_on_both_sides():
    two = LocalGrid(hospital_app(), hospitals=2)
    result = _run(two)
    assert result.arrays is None and "at least 3" in result.failure and not two.received  # the server never starts

    def shrink(record):  # a server that sends two hospitals' keys to a hospital
        for key in ("indices", "pk1", "pk2", "names", "signatures"):
            record[key] = list(record[key])[:2]
        record["threshold"] = 2

    grid = TamperingGrid(hospital_app(), hospitals=3, tamper=shrink)
    result = _run(grid)
    assert result.arrays is None
    assert any("at least 3" in m.error.reason for m in result.declined)
