"""The stage scheduler: S data-incremental stages × R rounds of train + evaluate, persisted after every round.

At each stage every hospital trains on the data that arrived at that stage only (no replay); after every round
the global adaptors are evaluated at each hospital on every stage's test data so far, which gives forgetting.
Class- and label-incremental schedules bring new diseases (prompt pairs) per stage instead of new data.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from server.evaluation import federated_metrics, site_macro
from server.secagg import secure_train
from server.state import RunState
from server.strategy import make_strategy
from server.strategy.adaptor_strategy import reply_order
from shared.config import AdaptorConfig, FederationConfig
from shared.labels import resolve_schema
from shared.model import RetuneModel
from shared.scenarios import disease_groups
from shared.signing import ARRAYS_SIGNATURE, sign_arrays
from shared.wire import ARRAYS, METRICS, adaptor_spec, payload_bytes, to_record

log = logging.getLogger(__name__)
RoundCallback = Callable[[dict, RunState], None]


def stage_diseases(config: FederationConfig) -> list[tuple[str, ...]]:
    """The diseases each stage's test AUROC is scored on (all of them for data-incremental stages)."""
    diseases = resolve_schema(config.diseases).diseases
    return [diseases] * config.stages if config.scenario == "data" else disease_groups(diseases, config.stages)


def initial_model(config: FederationConfig, embed_dim: int) -> RetuneModel:
    """Fresh adaptors, seeded by ``config.seed`` (what round 1 sends)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return RetuneModel(embed_dim, AdaptorConfig(kind=config.adaptor))


def hospital_name(msg: Message) -> str:
    """Simulated hospitals by partition, deployed ones by SuperNode id."""
    pid, node = reply_order(msg)
    return f"hospital-{pid}" if pid >= 0 else f"node-{node}"


def round_config(stage: int, round_: int, arrays, signing_key: Ed25519PrivateKey | None) -> ConfigRecord:
    """What the server sends with the adaptors: the position, and the consortium's signature of the adaptors."""
    values: dict = {"stage": stage, "round": round_}
    if signing_key is not None:
        values[ARRAYS_SIGNATURE] = sign_arrays(arrays, signing_key)
    return ConfigRecord(values)


def run_federation(grid: Grid, config: FederationConfig, embed_dim: int,
                   on_round: RoundCallback | None = None, signing_key: Ed25519PrivateKey | None = None) -> RunState:
    """Run (or resume) every remaining round; returns the final state. With ``signing_key`` every global
    adaptor set sent out is signed, so hospitals can refuse adaptors the consortium did not produce."""
    diseases = resolve_schema(config.diseases).diseases
    scored = stage_diseases(config)
    model = initial_model(config, embed_dim)
    strategy = make_strategy(config, adaptor_spec(model))
    state = RunState.open(config, to_record(model))
    strategy.load_optimizer_state(state.optimizer)
    if state.server_round:
        log.info("resuming %s at stage %d, round %d", config.run_dir, state.stage + 1, state.round + 1)
    while not state.done:
        start = time.perf_counter()
        stage, round_, server_round = state.stage, state.round, state.server_round + 1
        down = payload_bytes(state.arrays)
        train_msgs = list(strategy.configure_train(
            server_round, state.arrays, round_config(stage, round_, state.arrays, signing_key), grid))
        if config.secure_aggregation:  # the server sees masked vectors and their unmasked sum only
            arrays, train_metrics, secure = secure_train(grid, strategy, server_round, train_msgs,
                                                         config.round_timeout)
            accepted, declined = secure.accepted, secure.declined
            up = {hospital_name(r): secure.bytes_up[r.metadata.src_node_id] for r in accepted}
            sent_down = secure.bytes_down
        else:
            replies = sorted(grid.send_and_receive(train_msgs, timeout=config.round_timeout), key=reply_order)
            arrays, train_metrics = strategy.aggregate_train(server_round, replies)
            accepted = [r for r in replies if not r.has_error() and r.metadata.src_node_id not in
                        {node for node, _ in strategy.refused}]
            declined = [r for r in replies if r.has_error()]
            up = {hospital_name(r): payload_bytes(r.content[ARRAYS]) for r in accepted}
            sent_down = down * len(train_msgs)
        arrays = arrays if arrays is not None else state.arrays
        eval_msgs = list(strategy.configure_evaluate(
            server_round, arrays, round_config(stage, round_, arrays, signing_key), grid))
        evaluated = sorted((r for r in grid.send_and_receive(eval_msgs, timeout=config.round_timeout)
                            if not r.has_error()), key=reply_order)
        sites = {hospital_name(r): dict(r.content[METRICS]) for r in evaluated}
        record = {
            "stage": stage, "round": round_, "server_round": server_round,
            **federated_metrics(list(sites.values()), diseases, stage, scored),
            "bytes_up": sum(up.values()),
            "bytes_down": sent_down + payload_bytes(arrays) * len(eval_msgs),
            "bytes_up_per_hospital": up,
            "wall_s": time.perf_counter() - start,
            "clients": len(accepted),
            "train_loss": float(train_metrics["train-loss"]) if train_metrics else None,
            "hospitals": {name: site_macro(metrics, diseases) for name, metrics in sites.items()},
            "epsilon": {hospital_name(r): float(r.content[METRICS]["epsilon"]) for r in accepted
                        if "epsilon" in r.content[METRICS]},
            "declined": [{"hospital": hospital_name(r), "reason": r.error.reason} for r in declined],
        }
        strategy.refused.clear()
        state.commit(arrays, strategy.optimizer_state(), record)
        log.info("stage %d round %d: macro AUROC %s from %d hospitals", stage + 1, round_ + 1,
                 record["macro_auroc"], record["clients"])
        if on_round is not None:
            on_round(record, state)
    return state
