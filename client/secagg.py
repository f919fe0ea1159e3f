"""The hospital's side of secure aggregation: four train actions, per-round secrets in ``context.state``.

Protocol and design choice: :mod:`shared.secagg`; messages: :mod:`shared.wire`. :func:`register_secure_handlers`
adds the handlers to a ClientApp, inside the hospital's mods, so the boundary guard checks and audits every secure
reply like any other. The masked-vector handler runs the ordinary train handler and masks its reply: the plain
adaptors and example count never leave, only ``masked`` (uniform on Z/2^64 to anyone without the hospital's
self-mask seed), the hospital's name and backbone identity (``site``) and, optionally, the simulated
identity and DP ε/δ.

What a hospital checks before it reveals anything: it is in the roster it holds (node config ``roster``) under its
``name``, with the identity key it signs with (``secagg-key``); the stages arrive in order within one session;
a round (stage, round of the run) is set up once, and a hospital masks an update for it once, ever (kept beside
its audit log, across Flower runs: a server cannot rerun a round with and without one hospital and subtract the
sums); at least :data:`MIN_PARTICIPANTS` hospitals take part (with two, each would learn the other's update from
the sum); every peer's key announcement is signed by that peer's roster identity for this run and session, no name
appears twice, and its own keys come back unchanged; the threshold is a strict majority of the hospitals that
shared keys; relayed shares decrypt under the sender's key for this session and this
hospital; the server's survivors and dropped sets are disjoint, cover exactly the hospitals it exchanged shares with,
include itself and reach the threshold; it masks one update per round (two vectors under the same masks would
give away the difference of two updates); and it answers one unmask request per round, after which its secrets are
deleted. A hospital never reveals both the seed share and the key share of the same peer.

Flower's ``secaggplus_mod`` is not used: it converts replies through the legacy ``FitRes`` records and, as a mod,
would sit outside the boundary guard, which must see exactly what leaves.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared.identity import IdentityError, Roster, announcement, fingerprint, load_identity, sign, verify
from shared.secagg import (MIN_PARTICIPANTS, PROTOCOL, SESSION_BYTES, Layout, SecAggError, agree, check_threshold,
                           commitment, decrypt_shares, encode_update, encrypt_shares, mask_update, new_key_pair,
                           split_secret)
from shared.wire import (ARRAYS, CONFIG, MASKED, METRICS, NUM_EXAMPLES, SECAGG, SECAGG_MASKED, SECAGG_SETUP,
                         SECAGG_SHARE_KEYS, SECAGG_UNMASK, SECURE_METRICS, SITE, ArraySpec, WireError, check_reply,
                         secure_stage)

#: Where a hospital keeps the round's secrets, and the rounds it set up and masked (``context.state``; never sent).
STATE_KEY = "retune-secagg"
SETUPS_KEY, MASKED_KEY = "retune-secagg-setups", "retune-secagg-masked"
#: Node-config keys: the hospital's identity key (OpenSSH private key) and the consortium's roster.
IDENTITY_KEY, ROSTER_KEY = "secagg-key", "roster"
#: The record of the rounds a hospital masked an update for, beside its audit log (one JSON line each).
CONTRIBUTIONS = "secagg-contributions.jsonl"
TrainFn = Callable[[Message, Context], Message]
RunOf = Callable[[Context], str]


def register_secure_handlers(app: ClientApp, train: TrainFn, run_of: RunOf) -> None:
    """Register the four secure-aggregation train actions on ``app``; ``train`` is the plain train handler
    (``(msg, context) -> reply`` with ``arrays`` + ``metrics``), run at the masked-vector stage; ``run_of`` gives
    the run's identity (its run-config hash), by which contributions are remembered across Flower runs."""
    app.train(SECAGG_SETUP)(lambda msg, context: setup(msg, context, run_of))
    app.train(SECAGG_SHARE_KEYS)(share_keys)
    app.train(SECAGG_MASKED)(lambda msg, context: masked(msg, context, train, run_of))
    app.train(SECAGG_UNMASK)(unmask)


# --- identity and the record of contributions ---------------------------------------------------------------


def _identity_of(context: Context) -> tuple[str, Roster, object]:
    """(name, roster, private identity key) of this hospital; its roster entry must be its own key."""
    name, key_path, roster_path = (context.node_config.get(k) for k in ("name", IDENTITY_KEY, ROSTER_KEY))
    if not (name and key_path and roster_path):
        raise SecAggError("this hospital takes part in secure aggregation only with a name, an identity key and "
                          f"the consortium's roster in its node config ({IDENTITY_KEY!r}, {ROSTER_KEY!r})")
    try:
        roster, key = Roster.read(str(roster_path)), load_identity(str(key_path))
    except IdentityError as exc:
        raise SecAggError(str(exc)) from None
    if name not in roster.keys or fingerprint(roster.keys[name]) != fingerprint(key.public_key()):
        raise SecAggError(f"{name!r} is not in the roster with this hospital's identity key")
    return str(name), roster, key


def _contributions(context: Context) -> Path | None:
    audit = context.node_config.get("audit-log")
    return Path(str(audit)).parent / CONTRIBUTIONS if audit else None


def _positions(context: Context, key: str) -> list[str]:
    """Rounds recorded in ``context.state`` under ``key``, as ``"stage/round"``."""
    record = context.state.get(key)
    return list(record["positions"]) if isinstance(record, ConfigRecord) else []


def _remember(context: Context, key: str, position: list[int]) -> None:
    context.state[key] = ConfigRecord({"positions": [*_positions(context, key), f"{position[0]}/{position[1]}"]})


def _contributed(context: Context, run: str, position: list[int]) -> bool:
    """Whether this hospital masked an update for this round of this run before (in this or an earlier Flower
    run); without an audit log, in this Flower run only."""
    if f"{position[0]}/{position[1]}" in _positions(context, MASKED_KEY):
        return True
    path = _contributions(context)
    if path is None or not path.exists():
        return False
    mine = {"hospital": context.node_config.get("name"), "run": run, "position": position}
    return any(json.loads(line) == mine for line in path.read_text().splitlines() if line.strip())


def _record_contribution(context: Context, run: str, position: list[int]) -> None:
    """Remember a masked update before it leaves (fsync'ed: a crash after sending still counts)."""
    _remember(context, MASKED_KEY, position)
    path = _contributions(context)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(json.dumps({"hospital": context.node_config.get("name"), "run": run, "position": position})
                    + "\n")
            f.flush()
            os.fsync(f.fileno())


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


def setup(msg: Message, context: Context, run_of: RunOf) -> Message:
    """Stage 1: fresh key pairs for this round (once per round); reply with the public keys, signed."""
    params = _params(msg, SECAGG_SETUP)
    if params.get("protocol") != PROTOCOL:
        raise SecAggError(f"the server speaks {params.get('protocol')!r}, this hospital {PROTOCOL!r}")
    session = _get(params, "session", bytes, SESSION_BYTES)
    index = _get(params, "index", int)
    position = [_get(params, "stage", int), _get(params, "round", int)]
    name, _, identity = _identity_of(context)
    if f"{position[0]}/{position[1]}" in _positions(context, SETUPS_KEY) or \
            _contributed(context, run_of(context), position):
        raise SecAggError(f"a second setup for stage {position[0] + 1} round {position[1] + 1} of this run: refused")
    _remember(context, SETUPS_KEY, position)
    _forget(context)
    sk1, pk1 = new_key_pair()
    sk2, pk2 = new_key_pair()
    _save(context, {"stage": SECAGG_SHARE_KEYS, "session": session, "index": index, "position": position,
                    "name": name, "sk1": sk1, "pk1": pk1, "sk2": sk2, "pk2": pk2})
    signature = sign(identity, announcement(PROTOCOL, msg.metadata.run_id, session, index, name, pk1, pk2))
    return _reply(msg, context, {"pk1": pk1, "pk2": pk2, "name": name, "signature": signature})


def share_keys(msg: Message, context: Context) -> Message:
    """Stage 2: check everyone's keys and the threshold; Shamir-share the self-mask seed and ``sk1``; encrypt
    each peer's shares for that peer."""
    params = _params(msg, SECAGG_SHARE_KEYS)
    session = _get(params, "session", bytes, SESSION_BYTES)
    state = _state(context, SECAGG_SHARE_KEYS, session)
    me = state["index"]
    indices = _int_list(params, "indices")
    pk1s, pk2s = _get(params, "pk1", list), _get(params, "pk2", list)
    names, signatures = _get(params, "names", list), _get(params, "signatures", list)
    threshold = _get(params, "threshold", int)
    if not len(indices) == len(pk1s) == len(pk2s) == len(names) == len(signatures):
        raise SecAggError("the key lists differ in length")
    if len(indices) < MIN_PARTICIPANTS:
        raise SecAggError(f"{len(indices)} hospitals: secure aggregation needs at least {MIN_PARTICIPANTS}, or the "
                          "sum gives one hospital's update away to the other")
    check_threshold(threshold, len(indices))
    keys = dict(zip(indices, zip(pk1s, pk2s)))
    if keys.get(me) != (state["pk1"], state["pk2"]) or names[indices.index(me)] != state["name"]:
        raise SecAggError("the server did not relay this hospital's own announcement unchanged")
    flat = [k for pair in keys.values() for k in pair]
    if any(not isinstance(k, bytes) for k in flat) or len(set(flat)) != len(flat):
        raise SecAggError("public keys are malformed or repeated")
    _, roster, _ = _identity_of(context)
    if len(set(names)) != len(names):
        raise SecAggError("the server lists one hospital twice")
    for index, name, signature, (pk1, pk2) in zip(indices, names, signatures, zip(pk1s, pk2s)):
        signed = announcement(PROTOCOL, msg.metadata.run_id, session, index, name, pk1, pk2)
        if not isinstance(name, str) or name not in roster.keys:
            raise SecAggError(f"the server lists {name!r}, who is not in this hospital's roster")
        if not isinstance(signature, bytes) or not verify(roster.keys[name], signature, signed):
            raise SecAggError(f"the keys announced for {name!r} are not signed by {name!r}'s roster identity")
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


def masked(msg: Message, context: Context, train: TrainFn, run_of: RunOf) -> Message:
    """Stage 3: keep the shares relayed to this hospital, train, and reply with the masked update only (once per
    round of the run, ever)."""
    params = _params(msg, SECAGG_MASKED)
    session = _get(params, "session", bytes, SESSION_BYTES)
    state = _state(context, SECAGG_MASKED, session)
    config = msg.content.get(CONFIG)
    position = [int(config["stage"]), int(config["round"])] if isinstance(config, ConfigRecord) else None
    if position != list(state["position"]):
        raise SecAggError("the masked-vector stage is for another round than the one set up")
    if _contributed(context, run_of(context), position):
        raise SecAggError(f"this hospital already masked an update for stage {position[0] + 1} round "
                          f"{position[1] + 1} of this run")
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
    _record_contribution(context, run_of(context), position)
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
