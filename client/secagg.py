"""The hospital's side of secure aggregation: four train actions, per-round secrets in ``context.state``.

Protocol and design choice: :mod:`shared.secagg`; messages: :mod:`shared.wire`. :func:`register_secure_handlers`
adds the handlers to a ClientApp, inside the hospital's mods, so the boundary guard checks and audits every secure
reply like any other. The masked-vector handler runs the ordinary train handler and masks its reply: the plain
adaptors and example count never leave, only ``masked`` (uniform on Z/2^64 to anyone without the hospital's
self-mask seed), the hospital's name and backbone identity (``site``) and, optionally, the simulated
identity and DP ε/δ.

What a hospital checks before it reveals anything: the stages arrive in order within one session (a fresh setup
starts over); its own keys come back unchanged and no two hospitals share a key; the threshold is a strict majority
of the hospitals that shared keys; relayed shares decrypt under the sender's key for this session and this
hospital; the server's survivors and dropped sets are disjoint, cover exactly the hospitals it exchanged shares with,
include itself and reach the threshold; it masks one update per round (two vectors under the same masks would
give away the difference of two updates); and it answers one unmask request per round, after which its secrets are
deleted. A hospital never reveals both the seed share and the key share of the same peer.

Flower's ``secaggplus_mod`` is not used: it converts replies through the legacy ``FitRes`` records and, as a mod,
would sit outside the boundary guard, which must see exactly what leaves.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared.secagg import (PROTOCOL, SESSION_BYTES, Layout, SecAggError, agree, check_threshold, commitment,
                           decrypt_shares, encode_update, encrypt_shares, mask_update, new_key_pair, split_secret)
from shared.wire import (ARRAYS, MASKED, METRICS, NUM_EXAMPLES, SECAGG, SECAGG_MASKED, SECAGG_SETUP,
                         SECAGG_SHARE_KEYS, SECAGG_UNMASK, SECURE_METRICS, SITE, ArraySpec, WireError, check_reply,
                         secure_stage)

#: Where a hospital keeps the round's secrets (``context.state``; never sent).
STATE_KEY = "retune-secagg"
TrainFn = Callable[[Message, Context], Message]


def register_secure_handlers(app: ClientApp, train: TrainFn) -> None:
    """Register the four secure-aggregation train actions on ``app``; ``train`` is the plain train handler
    (``(msg, context) -> reply`` with ``arrays`` + ``metrics``), run at the masked-vector stage."""
    app.train(SECAGG_SETUP)(setup)
    app.train(SECAGG_SHARE_KEYS)(share_keys)
    app.train(SECAGG_MASKED)(lambda msg, context: masked(msg, context, train))
    app.train(SECAGG_UNMASK)(unmask)


# --- state ------------------------------------------------------------------------------------------------------


def _params(msg: Message, stage: str) -> ConfigRecord:
    if secure_stage(msg.metadata.message_type) != stage:
        raise SecAggError(f"expected a {stage} message, got {msg.metadata.message_type!r}")
    record = msg.content.get(SECAGG) if msg.has_content() else None
    if not isinstance(record, ConfigRecord):
        raise SecAggError(f"a {stage} message without its {SECAGG!r} record")
    return record


def _get(record: ConfigRecord, key: str, kind: type, size: int | None = None):
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, kind) or (size is not None and len(value) != size):
        raise SecAggError(f"secagg field {key!r} is missing or malformed")
    return value


def _int_list(record: ConfigRecord, key: str) -> list[int]:
    values = _get(record, key, list)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise SecAggError(f"secagg field {key!r} must list hospital indices")
    if len(set(values)) != len(values):
        raise SecAggError(f"secagg field {key!r} names a hospital twice")
    return values


def _state(context: Context, stage: str, session: bytes) -> dict:
    """The round's secrets, if the previous stage of the same session was the one before ``stage``."""
    record = context.state.get(STATE_KEY)
    if not isinstance(record, ConfigRecord):
        raise SecAggError(f"{stage} without a secure-aggregation round in progress")
    state = dict(record.items())
    if state["session"] != session:
        raise SecAggError(f"{stage} for another round than the one in progress")
    if state["stage"] != stage:
        raise SecAggError(f"{stage} out of order: the round in progress is at {state['stage']}")
    return state


def _save(context: Context, state: dict) -> None:
    context.state[STATE_KEY] = ConfigRecord(state)


def _forget(context: Context) -> None:
    if STATE_KEY in context.state:
        del context.state[STATE_KEY]


def _reply(msg: Message, context: Context, fields: dict) -> Message:
    content = RecordDict({SECAGG: ConfigRecord(fields)})
    identity = _identity(context)
    if identity:
        content[METRICS] = MetricRecord(identity)
    return Message(content, reply_to=msg)


def _identity(context: Context) -> dict[str, int]:
    return {"partition-id": int(context.node_config["partition-id"])} if "partition-id" in context.node_config else {}


# --- the four stages --------------------------------------------------------------------------------------------


def setup(msg: Message, context: Context) -> Message:
    """Stage 1: fresh key pairs for this round; reply with the public keys."""
    params = _params(msg, SECAGG_SETUP)
    if params.get("protocol") != PROTOCOL:
        raise SecAggError(f"the server speaks {params.get('protocol')!r}, this hospital {PROTOCOL!r}")
    session = _get(params, "session", bytes, SESSION_BYTES)
    index = _get(params, "index", int)
    _forget(context)  # a fresh setup abandons any round in progress
    sk1, pk1 = new_key_pair()
    sk2, pk2 = new_key_pair()
    _save(context, {"stage": SECAGG_SHARE_KEYS, "session": session, "index": index,
                    "sk1": sk1, "pk1": pk1, "sk2": sk2, "pk2": pk2})
    return _reply(msg, context, {"pk1": pk1, "pk2": pk2})


def share_keys(msg: Message, context: Context) -> Message:
    """Stage 2: check everyone's keys and the threshold; Shamir-share the self-mask seed and ``sk1``; encrypt
    each peer's shares for that peer."""
    params = _params(msg, SECAGG_SHARE_KEYS)
    session = _get(params, "session", bytes, SESSION_BYTES)
    state = _state(context, SECAGG_SHARE_KEYS, session)
    me = state["index"]
    indices = _int_list(params, "indices")
    pk1s, pk2s = _get(params, "pk1", list), _get(params, "pk2", list)
    threshold = _get(params, "threshold", int)
    if not len(indices) == len(pk1s) == len(pk2s):
        raise SecAggError("the key lists differ in length")
    check_threshold(threshold, len(indices))
    keys = dict(zip(indices, zip(pk1s, pk2s)))
    if keys.get(me) != (state["pk1"], state["pk2"]):
        raise SecAggError("the server did not relay this hospital's own public keys unchanged")
    flat = [k for pair in keys.values() for k in pair]
    if any(not isinstance(k, bytes) for k in flat) or len(set(flat)) != len(flat):
        raise SecAggError("public keys are malformed or repeated")
    seed = os.urandom(32)
    seed_shares = split_secret(seed, threshold, len(indices))
    key_shares = split_secret(state["sk1"], threshold, len(indices))
    destinations, ciphertexts = [], []
    for position, j in enumerate(indices):
        if j == me:
            state["own-shares"] = [seed_shares[position], key_shares[position]]
            continue
        destinations.append(j)
        ciphertexts.append(encrypt_shares(state["sk2"], keys[j][1], session, me, j,
                                          seed_shares[position], key_shares[position]))
    state.update({"stage": SECAGG_MASKED, "threshold": threshold, "seed": seed, "indices": indices,
                  "pk1s": pk1s, "pk2s": pk2s})
    _save(context, state)
    return _reply(msg, context, {"destinations": destinations, "ciphertexts": ciphertexts,
                                 "commitment": commitment(session, me, seed)})


def masked(msg: Message, context: Context, train: TrainFn) -> Message:
    """Stage 3: keep the shares relayed to this hospital, train, and reply with the masked update only."""
    params = _params(msg, SECAGG_MASKED)
    session = _get(params, "session", bytes, SESSION_BYTES)
    state = _state(context, SECAGG_MASKED, session)
    me, threshold = state["index"], state["threshold"]
    keys = dict(zip(state["indices"], zip(state["pk1s"], state["pk2s"])))
    sources = _int_list(params, "sources")
    ciphertexts = _get(params, "ciphertexts", list)
    if len(sources) != len(ciphertexts) or me in sources or not set(sources) <= set(keys):
        raise SecAggError("the relayed shares do not come from the hospitals that shared keys")
    if len(sources) + 1 < threshold:
        raise SecAggError(f"{len(sources) + 1} hospitals left, fewer than the threshold {threshold}")
    shares = [decrypt_shares(state["sk2"], keys[j][1], session, j, me, c) for j, c in zip(sources, ciphertexts)]

    incoming = msg.content.get(ARRAYS)
    if not isinstance(incoming, ArrayRecord):
        raise SecAggError("the masked-vector stage carries no global adaptors to train")
    spec = {name: ArraySpec(tuple(a.shape), a.dtype) for name, a in incoming.items()}
    reply = train(msg, context)
    if reply.has_error():  # e.g. an exhausted privacy budget: this hospital drops out of the round
        return reply
    try:
        check_reply(reply.content, spec)
    except WireError as exc:
        raise SecAggError(f"the train reply cannot be masked: {exc}") from None
    metrics = reply.content[METRICS]
    layout = Layout.of({name: s.shape for name, s in spec.items()})
    update = encode_update(layout, {name: a.numpy() for name, a in reply.content[ARRAYS].items()},
                           int(metrics[NUM_EXAMPLES]), float(metrics.get("train-loss", 0.0)))
    pair_secrets = {j: agree(state["sk1"], keys[j][0]) for j in sources}
    vector = mask_update(update, me, session, state["seed"], pair_secrets)
    content = RecordDict({MASKED: ArrayRecord({k: Array(v) for k, v in layout.split(vector).items()})})
    plain = {k: metrics[k] for k in sorted(SECURE_METRICS[SECAGG_MASKED]) if k in metrics}
    content[METRICS] = MetricRecord(plain)
    content[SITE] = reply.content[SITE]
    state.update({"stage": SECAGG_UNMASK, "sources": sources,
                  "seed-shares": [s for s, _ in shares], "key-shares": [k for _, k in shares]})
    _save(context, state)
    return Message(content, reply_to=msg)


def unmask(msg: Message, context: Context) -> Message:
    """Stage 4: reveal seed shares of the survivors and key shares of the dropped, once; then forget the round."""
    params = _params(msg, SECAGG_UNMASK)
    session = _get(params, "session", bytes, SESSION_BYTES)
    state = _state(context, SECAGG_UNMASK, session)
    me, threshold, sources = state["index"], state["threshold"], state["sources"]
    survivors = _int_list(params, "survivors")
    dropped = _int_list(params, "dropped") if "dropped" in params else []
    if set(survivors) & set(dropped):
        raise SecAggError("the server names a hospital both survivor and dropped")
    if set(survivors) | set(dropped) != set(sources) | {me} or me not in survivors:
        raise SecAggError("the survivors and dropped do not match the hospitals that exchanged shares")
    if len(survivors) < threshold:
        raise SecAggError(f"{len(survivors)} survivors, fewer than the threshold {threshold}")
    own_seed = state["own-shares"][0]
    seed_of = {**dict(zip(sources, state["seed-shares"])), me: own_seed}
    key_of = dict(zip(sources, state["key-shares"]))
    _forget(context)  # one answer per round: the secrets are gone before anything leaves
    fields = {"seed-shares": [seed_of[i] for i in survivors]}
    if dropped:
        fields["key-shares"] = [key_of[d] for d in dropped]
    return _reply(msg, context, fields)
