"""What each strategy (fedavg, fedprox, fedadam) hands back after aggregating train replies: the adaptors' own
names, shapes and dtype (float32, although FedAdam computes in float64), the values of its rule, and for FedAdam
server moments that carry a restarted run on exactly as an uninterrupted one."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from server.state import RunState
from server.strategy import make_strategy
from shared.config import AdaptorConfig, FederationConfig
from shared.model import RetuneModel
from shared.wire import ARRAYS, METRICS, NUM_EXAMPLES, SITE, adaptor_spec, site_record, to_record

DIM = 8
SPEC = adaptor_spec(RetuneModel(DIM))
BACKBONE = "ab" * 32
COUNTS = (10, 20, 30)
STRATEGIES = ("fedavg", "fedprox", "fedadam")


class _Nodes:
    """All a strategy's ``configure_train`` asks of the grid."""

    def get_node_ids(self):
        return [11, 22, 33]


#: The dtype replies cross the wire in (the strategies decode them to float32).
WIRE = FederationConfig().wire_dtype


def _random_record(seed: int) -> ArrayRecord:
    """Seeded random global adaptors (a fresh model is the identity map, mostly zeros)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return to_record(RetuneModel(DIM, AdaptorConfig(init="random")))


def _train_round(strategy, server_round: int, current: ArrayRecord, seed: int
                 ) -> tuple[ArrayRecord | None, MetricRecord | None, list[dict[str, np.ndarray]]]:
    """Configure a train round on ``current``, answer it from three hospitals (updates near ``current``, in the wire dtype,
    COUNTS examples), aggregate; returns (arrays, metrics, the hospitals' arrays)."""
    messages = list(strategy.configure_train(server_round, current, ConfigRecord({"stage": 0, "round": server_round}),
                                             _Nodes()))
    rng = np.random.default_rng(seed)
    replies, updates = [], []
    for k, msg in enumerate(sorted(messages, key=lambda m: m.metadata.dst_node_id)):
        meta = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=msg.metadata.dst_node_id,
                        reply_to_message_id="", group_id=msg.metadata.group_id, created_at=time.time(), ttl=600.0,
                        message_type="train")
        incoming = Message(metadata=meta, content=msg.content)
        received = incoming.content[ARRAYS]  # noise drawn in name order: a reloaded record may list them otherwise
        arrays = {name: (received[name].numpy() + 0.05 * rng.standard_normal(received[name].shape))
                  .astype(WIRE).astype(np.float32) for name in sorted(received.keys())}  # what the wire carries
        updates.append(arrays)
        content = RecordDict({ARRAYS: ArrayRecord({name: Array(v.astype(WIRE)) for name, v in arrays.items()}),
                              METRICS: MetricRecord({NUM_EXAMPLES: COUNTS[k], "train-loss": 0.1 * (k + 1)}),
                              SITE: site_record(f"hospital-{k}", BACKBONE)})
        replies.append(Message(content, reply_to=incoming))
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return arrays, metrics, updates


def _weighted_mean(updates: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: sum(u[name].astype(np.float64) * n for u, n in zip(updates, COUNTS)) / sum(COUNTS)
            for name in updates[0]}


def _assert_adaptor_arrays(arrays: ArrayRecord) -> None:
    """Exactly the adaptors' names and shapes, every one float32 (declared and as numpy reads it)."""
    assert arrays is not None and set(arrays.keys()) == set(SPEC)
    for name, array in arrays.items():
        assert array.dtype == "float32" and array.numpy().dtype == np.float32, (name, array.dtype)
        assert tuple(array.shape) == SPEC[name].shape and np.isfinite(array.numpy()).all(), name


@pytest.mark.parametrize("name", STRATEGIES)
def test_aggregated_adaptors_are_float32_with_the_strategys_values(name):
    strategy = make_strategy(FederationConfig(strategy=name, min_hospitals=3, server_lr=0.05), SPEC)
    current = _random_record(0)
    arrays, metrics, updates = _train_round(strategy, 1, current, seed=1)
    _assert_adaptor_arrays(arrays)
    assert int(metrics[NUM_EXAMPLES]) == sum(COUNTS)
    assert float(metrics["train-loss"]) == pytest.approx((0.1 * 10 + 0.2 * 20 + 0.3 * 30) / 60)
    mean = _weighted_mean(updates)
    if name == "fedadam":  # a server Adam step from the current adaptors, not the average itself
        assert all(not np.allclose(arrays[k].numpy(), mean[k], atol=1e-4) for k in SPEC)
        assert all(not np.array_equal(arrays[k].numpy(), current[k].numpy()) for k in SPEC)
    else:
        for key, value in mean.items():
            np.testing.assert_allclose(arrays[key].numpy(), value, rtol=0, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", STRATEGIES)
def test_the_servers_own_aggregate_is_float32_too(name):
    """``aggregate_checked`` (the secure-aggregation sum, no hospital's reply) goes out in the adaptors' dtype."""
    strategy = make_strategy(FederationConfig(strategy=name, min_hospitals=3, server_lr=0.05), SPEC)
    current = _random_record(0)
    messages = list(strategy.configure_train(1, current, ConfigRecord({"stage": 0, "round": 1}), _Nodes()))
    total = Message(RecordDict({ARRAYS: ArrayRecord({k: Array(a.numpy() + np.float32(0.01))
                                                     for k, a in current.items()}),
                                METRICS: MetricRecord({NUM_EXAMPLES: 60})}), reply_to=Message(
        metadata=Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0,
                          dst_node_id=messages[0].metadata.dst_node_id, reply_to_message_id="",
                          group_id=messages[0].metadata.group_id, created_at=time.time(), ttl=600.0,
                          message_type="train"), content=messages[0].content))
    arrays, _ = strategy.aggregate_checked(1, [total])
    _assert_adaptor_arrays(arrays)


def test_fedadam_moments_survive_a_restart_through_the_run_state(tmp_path):
    """Round 1, commit (adaptors and moments), reopen the run folder in a new strategy, round 2: the same adaptors
    as an uninterrupted run; a restart that lost the moments lands elsewhere."""
    config = FederationConfig(strategy="fedadam", min_hospitals=3, server_lr=0.05, stages=1, rounds_per_stage=3,
                              run_dir=str(tmp_path / "run"))
    start = _random_record(0)
    uninterrupted = make_strategy(config, SPEC)
    after_1, _, _ = _train_round(uninterrupted, 1, start, seed=1)
    after_2, _, _ = _train_round(uninterrupted, 2, after_1, seed=2)

    before = make_strategy(config, SPEC)
    committed, _, _ = _train_round(before, 1, start, seed=1)
    moments = before.optimizer_state()
    assert {k.split("/")[0] for k in moments} == {"m", "v"} and len(moments) == 2 * len(SPEC)
    assert all(np.abs(v).max() > 0 for v in moments.values())
    RunState.open(config, start).commit(committed, moments, {"macro_auroc": 0.5})

    resumed = RunState.open(config, start)
    _assert_adaptor_arrays(resumed.arrays)
    assert all(np.array_equal(resumed.arrays[k].numpy(), after_1[k].numpy()) for k in SPEC)
    assert set(resumed.optimizer) == set(moments)
    for key, value in moments.items():
        assert resumed.optimizer[key].dtype == value.dtype and np.array_equal(resumed.optimizer[key], value), key
    after = make_strategy(config, SPEC)
    after.load_optimizer_state(resumed.optimizer)
    again, _, _ = _train_round(after, 2, resumed.arrays, seed=2)
    _assert_adaptor_arrays(again)
    for key in SPEC:
        assert np.array_equal(again[key].numpy(), after_2[key].numpy()), key

    cold = make_strategy(config, SPEC)  # moments lost on restart
    lost, _, _ = _train_round(cold, 2, resumed.arrays, seed=2)
    assert any(not np.allclose(lost[key].numpy(), after_2[key].numpy(), atol=1e-6) for key in SPEC)
