"""The stage scheduler: S data-incremental stages × R rounds of train + evaluate, persisted after every round.

At each stage every hospital trains on the data that arrived at that stage (with run config ``continual`` ``replay``,
on its own earlier stages' data too: :mod:`shared.continual`); after every round the global adaptors are evaluated
at each hospital on every stage's test data so far, which gives forgetting.
Class- and label-incremental schedules bring new diseases (prompt pairs) per stage instead of new data.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from server.evaluation import evaluation_problem, federated_metrics, site_macro
from server.hospitals import FederationError, Hospitals
from server.messaging import HeldArrays, exchange
from server.secagg import secure_train
from server.state import RunState, SealRegister
from server.strategy import make_strategy
from server.strategy.adaptor_strategy import AdaptorStrategy, reply_order
from shared.config import FederationConfig, run_identity
from shared.labels import resolve_schema
from shared.model import RetuneModel, federation_model
from shared.scenarios import disease_groups
from shared.signing import ARRAYS_SIGNATURE, RoundBinding, arrays_digest, sign_round
from shared.wire import ARRAYS, ARRAYS_DIGEST, CONFIG, METRICS, adaptor_spec, decoded, encoded, payload_bytes, to_record

log = logging.getLogger(__name__)
RoundCallback = Callable[[dict, RunState], None]


def stage_diseases(config: FederationConfig) -> list[tuple[str, ...]]:
    """The diseases each stage's test AUROC is scored on (all of them for data-incremental stages)."""
    diseases = resolve_schema(config.diseases).diseases
    return [diseases] * config.stages if config.scenario == "data" else disease_groups(diseases, config.stages)


def initial_model(config: FederationConfig, embed_dim: int) -> RetuneModel:
    """Fresh adaptors (and LoRA matrices), seeded by ``config.seed`` (what round 1 sends); for the ``lora`` and
    ``both`` kinds the server loads the backbone named by run config ``backbone`` for LoRA's shapes."""
    return federation_model(config, embed_dim, config.backbone)


def round_config(binding: RoundBinding, arrays: ArrayRecord, signing_key: Ed25519PrivateKey | None) -> ConfigRecord:
    """What the server sends with the adaptors (``arrays`` as on the wire): the position, the adaptors' digest,
    and the consortium's signature of them for exactly this run, stage, round and kind (so a signed round cannot be
    replayed or re-targeted)."""
    values: dict = {"stage": binding.stage, "round": binding.round, ARRAYS_DIGEST: arrays_digest(arrays).hex()}
    if signing_key is not None:
        values[ARRAYS_SIGNATURE] = sign_round(arrays, binding, signing_key)
    return ConfigRecord(values)


def wait_for_hospitals(grid: Grid, config: FederationConfig) -> None:
    """Return once ``min_hospitals`` are connected, saying so while waiting; fail after ``join_timeout``."""
    start = time.monotonic()
    said = -math.inf
    while (connected := len(list(grid.get_node_ids()))) < config.min_hospitals:
        waited = time.monotonic() - start
        if waited > config.join_timeout:
            raise FederationError(f"only {connected} of the {config.min_hospitals} hospitals this run needs "
                                  f"(min-hospitals) are connected after {waited:.0f} s: the run cannot go on")
        if waited - said >= 10:
            log.warning("waiting for hospitals: %d of the %d this run needs are connected (giving up after %.0f s)",
                        connected, config.min_hospitals, config.join_timeout)
            said = waited
        time.sleep(1)


@dataclass
class TrainOutcome:
    """The train part of a round: the new global adaptors (None: keep the old ones) and who took part."""

    arrays: ArrayRecord | None
    metrics: MetricRecord | None
    accepted: list[Message]
    declined: list[dict[str, str]]
    refused: list[dict[str, str]]
    bytes_up: dict[str, int]
    bytes_down: int
    agreed: list[int] | None = None


def _outgoing(messages: Iterable[Message], arrays: ArrayRecord) -> list[Message]:
    """The strategy's messages, each with its own content (Flower's share one), carrying ``arrays`` (the global
    adaptors as they cross the wire)."""
    messages = list(messages)
    for message in messages:
        message.content = RecordDict({**dict(message.content.items()), ARRAYS: arrays})
    return messages


def _send(grid: Grid, messages: list[Message], arrays: ArrayRecord, held: HeldArrays, timeout: float | None
          ) -> tuple[dict[int, Message], int]:
    """Send ``messages`` with ``arrays``, or without them to whoever holds them; the replies by node, and the bytes
    of adaptors sent."""
    digest = str(messages[0].content[CONFIG][ARRAYS_DIGEST]) if messages else ""
    held.lighten(messages, digest)
    carried = sum(ARRAYS in m.content for m in messages)
    replies = exchange(grid, messages, timeout)
    replies, resent = held.resend(grid, messages, arrays, replies, timeout)
    held.record(replies, digest)
    return replies, payload_bytes(arrays) * (carried + resent)


def train_round(grid: Grid, config: FederationConfig, strategy: AdaptorStrategy, hospitals: Hospitals,
                server_round: int, state: RunState, signing_key: Ed25519PrivateKey | None, run_id: int,
                held: HeldArrays, agreed: list[int] | None = None) -> TrainOutcome:
    """Send the global adaptors to every connected hospital (in the wire dtype; not to those that hold them) and
    aggregate the admitted replies. In secure mode, ``agreed`` (from an earlier attempt of this round whose
    survivors signed their set) are the only hospitals asked: their updates may be summed with each other only."""
    binding = RoundBinding(run_id, run_identity(config.to_run_config()), state.stage, state.round, "train")
    # secure aggregation masks float32 updates (its vectors are 64-bit whatever the wire dtype): no rounding there
    sent = encoded(state.arrays, "float32" if config.secure_aggregation else config.wire_dtype)
    # updates are measured from what the hospitals start from (FedAdam's pseudo-gradient, the containment norm)
    train_msgs = _outgoing(strategy.configure_train(
        server_round, decoded(sent), round_config(binding, sent, signing_key), grid), sent)
    if config.secure_aggregation:  # the server sees masked vectors and their unmasked sum only
        if agreed:
            train_msgs = [m for m in train_msgs if m.metadata.dst_node_id in agreed]
        arrays, metrics, secure = secure_train(grid, strategy, server_round, train_msgs, config.round_timeout,
                                               hospitals.admit)
        hospitals.names.update(secure.names)
        errors = {m.metadata.src_node_id: m for m in secure.declined}
        return TrainOutcome(arrays, metrics, secure.accepted, _declined(hospitals, errors, errors, config),
                            secure.refused, {hospitals.name(r): secure.bytes_up[r.metadata.src_node_id]
                                             for r in secure.accepted}, secure.bytes_down, agreed or secure.agreed)
    by_node, bytes_down = _send(grid, train_msgs, sent, held, config.round_timeout)
    replies = sorted((r for r in by_node.values() if not r.has_error()), key=reply_order)
    admitted, refused = hospitals.admit(replies)
    arrays, metrics = strategy.aggregate_train(server_round, admitted)
    wire_refused = {node: reason for node, reason in strategy.refused}
    strategy.refused.clear()
    accepted = [r for r in admitted if r.metadata.src_node_id not in wire_refused]
    refused += [{"hospital": hospitals.name(r), "reason": wire_refused[r.metadata.src_node_id]}
                for r in admitted if r.metadata.src_node_id in wire_refused]
    declined = _declined(hospitals, [m.metadata.dst_node_id for m in train_msgs], by_node, config)
    return TrainOutcome(arrays if accepted else None, metrics, accepted, declined, refused,
                        {hospitals.name(r): payload_bytes(r.content[ARRAYS]) for r in accepted}, bytes_down)


def _declined(hospitals: Hospitals, nodes: Iterable[int], replies: dict[int, Message], config: FederationConfig
              ) -> list[dict[str, str]]:
    """Hospitals among ``nodes`` that answered with an error (a refusal, a failure: its reason) or not at all."""
    silent = f"no reply within round-timeout ({config.round_timeout:g} s)"
    return [{"hospital": hospitals.name_of(node), "reason": error_reason(replies[node].error.reason)
             if node in replies else silent}
            for node in sorted(set(nodes), key=hospitals.name_of) if node not in replies or replies[node].has_error()]


def error_reason(reason: str, limit: int = 300) -> str:
    """An error reply's reason as the round record keeps it: an exception that Flower reports arrives wrapped in
    its traceback (with terminal colours); keep its own message, on one line."""
    reason = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    if "Message: " in reason:
        reason = reason.rsplit("Message: ", 1)[1].rstrip("'>")
    reason = " ".join(reason.split())
    return reason if len(reason) <= limit else reason[:limit - 1] + "…"


@dataclass
class EvaluateOutcome:
    """The evaluate part of a round: each counted hospital's metrics, and who was refused or declined."""

    sites: dict[str, dict[str, float]]
    declined: list[dict[str, str]]
    refused: list[dict[str, str]]
    bytes_down: int


def evaluate_round(grid: Grid, config: FederationConfig, strategy: AdaptorStrategy, hospitals: Hospitals,
                   server_round: int, arrays: ArrayRecord, binding: RoundBinding,
                   signing_key: Ed25519PrivateKey | None, held: HeldArrays) -> EvaluateOutcome:
    """Have every connected hospital score ``arrays`` (sent in the wire dtype); a reply that fails
    :func:`evaluation_problem` is refused."""
    sent = encoded(arrays, config.wire_dtype)
    eval_msgs = _outgoing(strategy.configure_evaluate(server_round, sent, round_config(binding, sent, signing_key),
                                                      grid), sent)
    by_node, bytes_down = _send(grid, eval_msgs, sent, held, config.round_timeout)
    admitted, refused = hospitals.admit(sorted((r for r in by_node.values() if not r.has_error()), key=reply_order))
    sites = {}
    for reply in admitted:
        problem = evaluation_problem(reply.content)
        if problem is None:
            sites[hospitals.name(reply)] = dict(reply.content[METRICS])
        else:
            log.warning("round %d: refused the evaluate reply of %s: %s", server_round, hospitals.name(reply), problem)
            refused.append({"hospital": hospitals.name(reply), "reason": problem})
    declined = _declined(hospitals, [m.metadata.dst_node_id for m in eval_msgs], by_node, config)
    return EvaluateOutcome(sites, declined, refused, bytes_down)


def _phase(entries: list[dict[str, str]], phase: str) -> list[dict[str, str]]:
    return [{**entry, "phase": phase} for entry in entries]


def run_federation(grid: Grid, config: FederationConfig, embed_dim: int, on_round: RoundCallback | None = None,
                   signing_key: Ed25519PrivateKey | None = None, run_id: int = 0,
                   seals: SealRegister | None = None) -> RunState:
    """Run (or resume) every remaining round; returns the final state. With ``signing_key`` every global
    adaptor set sent out is signed for this Flower run (``run_id``), stage, round and kind, so hospitals refuse
    adaptors the consortium did not produce and rounds replayed from elsewhere, and every committed round of the run
    folder is sealed, so a resumption refuses a folder changed since.

    A round counts only when at least ``min_hospitals`` hospitals' updates were aggregated; otherwise it is run
    again, up to ``round_retries`` times, and then the run fails with :class:`FederationError`.
    """
    diseases = resolve_schema(config.diseases).diseases
    scored = stage_diseases(config)
    model = initial_model(config, embed_dim)
    strategy = make_strategy(config, adaptor_spec(model))
    state = RunState.open(config, to_record(model), signing_key, seals)
    strategy.load_optimizer_state(state.optimizer)
    hospitals = Hospitals(config.backbone_identity or state.backbone, state.hospitals)
    held = HeldArrays()
    if state.server_round:
        log.info("resuming %s at stage %d, round %d", config.run_dir, state.stage + 1, state.round + 1)
    while not state.done:
        start = time.perf_counter()
        stage, round_, server_round = state.stage, state.round, state.server_round + 1
        agreed: list[int] | None = None  # secure mode: the survivors an earlier attempt's hospitals signed
        for attempt in range(config.round_retries + 1):
            wait_for_hospitals(grid, config)
            train = train_round(grid, config, strategy, hospitals, server_round, state, signing_key, run_id, held,
                                agreed)
            agreed = train.agreed
            if len(train.accepted) >= config.min_hospitals and train.arrays is not None:
                break
            why = "; ".join(f"{d['hospital']}: {d['reason']}" for d in train.declined + train.refused) or "no replies"
            message = (f"stage {stage + 1} round {round_ + 1}: {len(train.accepted)} hospital update(s) aggregated, "
                       f"fewer than min-hospitals {config.min_hospitals} ({why})")
            if attempt == config.round_retries:
                raise FederationError(f"{message}; the round was tried {attempt + 1} times, the run stops")
            log.warning("%s: the round does not count; trying it again (%d of %d)", message, attempt + 2,
                        config.round_retries + 1)
        arrays = train.arrays
        binding = RoundBinding(run_id, run_identity(config.to_run_config()), stage, round_, "evaluate")
        evaluation = evaluate_round(grid, config, strategy, hospitals, server_round, arrays, binding, signing_key,
                                    held)
        sites = evaluation.sites
        record = {
            "stage": stage, "round": round_, "server_round": server_round, "attempts": attempt + 1,
            **federated_metrics(list(sites.values()), diseases, stage, scored),
            "bytes_up": sum(train.bytes_up.values()),
            "bytes_down": train.bytes_down + evaluation.bytes_down,
            "bytes_up_per_hospital": train.bytes_up,
            "wall_s": time.perf_counter() - start,
            "clients": len(train.accepted),
            "train_loss": float(train.metrics["train-loss"]) if train.metrics and "train-loss" in train.metrics
            else None,  # DP hospitals send no un-noised loss
            "hospitals": {name: site_macro(metrics, diseases) for name, metrics in sites.items()},
            "declined": _phase(train.declined, "train") + _phase(evaluation.declined, "evaluate"),
            "refused": _phase(train.refused, "train") + _phase(evaluation.refused, "evaluate"),
        }
        state.commit(arrays, strategy.optimizer_state(), record, hospitals.identity, hospitals.names, signing_key)
        log.info("stage %d round %d: macro AUROC %s from %d hospitals", stage + 1, round_ + 1,
                 record["macro_auroc"], record["clients"])
        if on_round is not None:
            on_round(record, state)
    return state
