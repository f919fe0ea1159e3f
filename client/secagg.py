"""The hospital's side of secure aggregation: five train actions, per-round secrets in ``context.state``.

Protocol and design choice: :mod:`shared.secagg`; messages: :mod:`shared.wire`. :func:`register_secure_handlers`
adds the handlers to a ClientApp, inside the hospital's mods, so the boundary guard checks and audits every secure
reply like any other. The masked-vector handler runs the ordinary train handler and masks its reply: the plain
adaptors and example count never leave, only ``masked`` (uniform on Z/2^64 to anyone without the hospital's
self-mask seed), the hospital's name and backbone identity (``site``) and, optionally, the simulated identity.

What a hospital checks before it reveals anything: it is in the roster it holds (node config ``roster``) under its
``name``, with the identity key it signs with (``secagg-key``); the stages arrive in order within one session;
at least ``secagg-min-hospitals`` hospitals share keys (never fewer than :data:`MIN_PARTICIPANTS`: with two, each
would learn the other's update from the sum); every peer's key announcement is signed by that peer's roster
identity for this run and session, no name appears twice, and its own keys come back unchanged; the threshold is a
strict majority of the hospitals that shared keys and more than ``secagg-max-colluders``; relayed shares decrypt
under the sender's key for this session and this hospital; it masks one update per session.

**Consistency check** (Bonawitz et al. 2017, round 3): before any unmask share, the server names the survivors
(whose masked vectors are in the sum) and the dropped; each hospital checks the sets (disjoint, exactly the
hospitals it exchanged shares with, itself a survivor, at least the threshold), signs them once with its roster
identity, and reveals shares only if more than (hospitals + ``secagg-max-colluders``) / 2 of the survivors signed
exactly the sets it signed, for exactly the key sharing it took part in (the signature binds the session's
transcript: every member's fresh keys). A hospital sets up a session once: a server cannot collect two signatures of
one hospital for one session. Two different survivor sets would then need a common signer, an honest one signing
twice, unless more peers collude than the hospital allows: a server cannot tell one hospital that H survived (its
share of H's self-mask seed) and another that H dropped (its share of H's mask key). A hospital told inconsistent
sets aborts (:class:`shared.secagg.SecAggError`, naming the round in its audit log).

**Once per update** (:mod:`client.secagg_record`): an update (known by the global adaptors it started from with
the stage data it trained on, and by its own digest) that a hospital agreed to have summed with some hospitals is
never summed with another set, under any run identity, so the rerun-and-subtract attack fails.

It answers one unmask request per session, after which its secrets are deleted, and never reveals both the seed
share and the key share of the same peer.

Flower's ``secaggplus_mod`` is not used: it converts replies through the legacy ``FitRes`` records and, as a mod,
would sit outside the boundary guard, which must see exactly what leaves.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.floor import PrivacyFloor
from client.secagg_record import agree_to_sum
from shared.identity import (IdentityError, Roster, announcement, fingerprint, load_identity, session_transcript, sign,
                             survivors_view, verify)
from shared.secagg import (MIN_PARTICIPANTS, PROTOCOL, SESSION_BYTES, Layout, SecAggError, agree, check_threshold,
                           commitment, decrypt_shares, encode_update, encrypt_shares, mask_update, new_key_pair,
                           split_secret)
from shared.signing import arrays_digest
from shared.wire import (ARRAYS, CONFIG, MASKED, METRICS, NUM_EXAMPLES, SECAGG, SECAGG_CONSISTENCY, SECAGG_MASKED,
                         SECAGG_SETUP, SECAGG_SHARE_KEYS, SECAGG_UNMASK, SECURE_METRICS, SITE, ArraySpec, WireError,
                         check_reply, secure_stage)

#: Where a hospital keeps the round's secrets, and the sessions it set up in this Flower run (``context.state``;
#: never sent).
STATE_KEY, SESSIONS_KEY = "retune-secagg", "retune-secagg-sessions"
#: Node-config keys: the hospital's identity key (OpenSSH private key) and the consortium's roster.
IDENTITY_KEY, ROSTER_KEY = "secagg-key", "roster"
#: The plain train handler, returning its reply and the digest of the stage data it trained on.
TrainFn = Callable[[Message, Context], tuple[Message, str]]


def register_secure_handlers(app: ClientApp, train: TrainFn) -> None:
    """Register the five secure-aggregation train actions on ``app``; ``train`` is the plain train handler
    (``(msg, context) -> (reply, data digest)``, the reply with ``arrays`` + ``metrics``), run at the masked-vector
    stage."""
    app.train(SECAGG_SETUP)(setup)
    app.train(SECAGG_SHARE_KEYS)(share_keys)
    app.train(SECAGG_MASKED)(lambda msg, context: masked(msg, context, train))
    app.train(SECAGG_CONSISTENCY)(consistency)
    app.train(SECAGG_UNMASK)(unmask)


# --- identity ---------------------------------------------------------------------------------------------------


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


def _floor(context: Context) -> PrivacyFloor:
    return PrivacyFloor.from_node_config(dict(context.node_config))


def quorum(hospitals: int, threshold: int, colluders: int) -> int:
    """Signatures of one survivor set a hospital needs before it unmasks: more than (hospitals + colluders) / 2,
    so that two different sets cannot both reach it without an honest hospital signing twice, and at least the
    threshold."""
    return max(threshold, (hospitals + colluders) // 2 + 1)


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


def _sessions(context: Context) -> list[str]:
    record = context.state.get(SESSIONS_KEY)
    return list(record["sessions"]) if isinstance(record, ConfigRecord) else []


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
    """Stage 1: fresh key pairs for this session; reply with the public keys, signed."""
    params = _params(msg, SECAGG_SETUP)
    if params.get("protocol") != PROTOCOL:
        raise SecAggError(f"the server speaks {params.get('protocol')!r}, this hospital {PROTOCOL!r}")
    session = _get(params, "session", bytes, SESSION_BYTES)
    index = _get(params, "index", int)
    position = [_get(params, "stage", int), _get(params, "round", int)]
    name, _, identity = _identity_of(context)
    seen = _sessions(context)
    if session.hex() in seen:
        raise SecAggError("a second setup for a session this hospital set up before: one set of keys per session")
    context.state[SESSIONS_KEY] = ConfigRecord({"sessions": [*seen, session.hex()]})
    _forget(context)
    sk1, pk1 = new_key_pair()
    sk2, pk2 = new_key_pair()
    _save(context, {"stage": SECAGG_SHARE_KEYS, "session": session, "index": index, "position": position,
                    "name": name, "sk1": sk1, "pk1": pk1, "sk2": sk2, "pk2": pk2})
    signature = sign(identity, announcement(PROTOCOL, msg.metadata.run_id, session, index, name, pk1, pk2))
    return _reply(msg, context, {"pk1": pk1, "pk2": pk2, "name": name, "signature": signature})


def share_keys(msg: Message, context: Context) -> Message:
    """Stage 2: check everyone's keys, their number and the threshold; Shamir-share the self-mask seed and
    ``sk1``; encrypt each peer's shares for that peer."""
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
    floor = _floor(context)
    fewest = max(MIN_PARTICIPANTS, floor.secagg_min_hospitals)
    if len(indices) < fewest:
        raise SecAggError(f"{len(indices)} hospitals: this hospital takes part in secure rounds of at least {fewest} "
                          "(with two, the sum gives one hospital's update away to the other)")
    check_threshold(threshold, len(indices))
    if threshold <= floor.secagg_max_colluders:
        raise SecAggError(f"threshold {threshold}: {floor.secagg_max_colluders} colluding peers "
                          "(secagg-max-colluders) could reconstruct a hospital's secrets alone")
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
    transcript = session_transcript(PROTOCOL, msg.metadata.run_id, session, list(state["position"]), indices, names,
                                    pk1s, pk2s, threshold)
    state.update({"stage": SECAGG_MASKED, "threshold": threshold, "seed": seed, "indices": indices,
                  "pk1s": pk1s, "pk2s": pk2s, "names": names, "transcript": transcript})
    _save(context, state)
    return _reply(msg, context, {"destinations": destinations, "ciphertexts": ciphertexts,
                                 "commitment": commitment(session, me, seed)})


def masked(msg: Message, context: Context, train: TrainFn) -> Message:
    """Stage 3: keep the shares relayed to this hospital, train, and reply with the masked update only (once per
    session)."""
    params = _params(msg, SECAGG_MASKED)
    session = _get(params, "session", bytes, SESSION_BYTES)
    state = _state(context, SECAGG_MASKED, session)
    config = msg.content.get(CONFIG)
    position = [int(config["stage"]), int(config["round"])] if isinstance(config, ConfigRecord) else None
    if position != list(state["position"]):
        raise SecAggError("the masked-vector stage is for another round than the one set up")
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
    reply, data = train(msg, context)
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
    state.update({"stage": SECAGG_CONSISTENCY, "sources": sources, "start": arrays_digest(incoming).hex(),
                  "data": data, "update": hashlib.sha256(update.tobytes()).hexdigest(),
                  "seed-shares": [s for s, _ in shares], "key-shares": [k for _, k in shares]})
    _save(context, state)
    return Message(content, reply_to=msg)


def _view(params: ConfigRecord, state: dict) -> tuple[list[int], list[int]]:
    """The survivors and dropped the server names, checked against what this hospital exchanged."""
    me, sources = state["index"], state["sources"]
    survivors = _int_list(params, "survivors")
    dropped = _int_list(params, "dropped") if "dropped" in params else []
    if set(survivors) & set(dropped):
        raise SecAggError("the server names a hospital both survivor and dropped")
    if set(survivors) | set(dropped) != set(sources) | {me} or me not in survivors:
        raise SecAggError("the survivors and dropped do not match the hospitals that exchanged shares")
    if len(survivors) < state["threshold"]:
        raise SecAggError(f"{len(survivors)} survivors, fewer than the threshold {state['threshold']}")
    return sorted(survivors), sorted(dropped)


def consistency(msg: Message, context: Context) -> Message:
    """Stage 4: check the server's survivor set, agree to have this update summed with exactly those hospitals
    (never with another set: :func:`client.secagg_record.agree_to_sum`), and sign the set, once."""
    params = _params(msg, SECAGG_CONSISTENCY)
    session = _get(params, "session", bytes, SESSION_BYTES)
    state = _state(context, SECAGG_CONSISTENCY, session)
    survivors, dropped = _view(params, state)
    name_of = dict(zip(state["indices"], state["names"]))
    agree_to_sum(context.node_config, context.state, state["name"], state["start"], state["data"], state["update"],
                 [name_of[i] for i in survivors])
    _, _, identity = _identity_of(context)
    signature = sign(identity, survivors_view(state["transcript"], survivors, dropped))
    state.update({"stage": SECAGG_UNMASK, "survivors": survivors, "dropped": dropped})
    _save(context, state)
    return _reply(msg, context, {"signature": signature})


def unmask(msg: Message, context: Context) -> Message:
    """Stage 5: once enough survivors signed the very sets this hospital signed, reveal seed shares of the
    survivors and key shares of the dropped, once; then forget the round."""
    params = _params(msg, SECAGG_UNMASK)
    session = _get(params, "session", bytes, SESSION_BYTES)
    state = _state(context, SECAGG_UNMASK, session)
    stage, round_ = state["position"]
    if _view(params, state) != (state["survivors"], state["dropped"]):
        raise SecAggError(f"stage {stage + 1} round {round_ + 1}: the server named other survivors at unmask than "
                          "the ones this hospital signed: inconsistent survivor sets")
    signers, signatures = _int_list(params, "signers"), _get(params, "signatures", list)
    if len(signers) != len(signatures) or not set(signers) <= set(state["survivors"]):
        raise SecAggError(f"stage {stage + 1} round {round_ + 1}: signatures of hospitals that are not survivors")
    _, roster, _ = _identity_of(context)
    name_of = dict(zip(state["indices"], state["names"]))
    view = survivors_view(state["transcript"], state["survivors"], state["dropped"])
    valid = sum(isinstance(sig, bytes) and verify(roster.keys[name_of[i]], sig, view)
                for i, sig in zip(signers, signatures))
    needed = quorum(len(state["indices"]), state["threshold"], _floor(context).secagg_max_colluders)
    if valid < needed:
        raise SecAggError(f"stage {stage + 1} round {round_ + 1}: {valid} of the survivors signed the survivor set "
                          f"this hospital signed, {needed} needed: the server may be showing hospitals "
                          "inconsistent survivor sets")
    me = state["index"]
    own_seed = state["own-shares"][0]
    seed_of = {**dict(zip(state["sources"], state["seed-shares"])), me: own_seed}
    key_of = dict(zip(state["sources"], state["key-shares"]))
    _forget(context)  # one answer per round: the secrets are gone before anything leaves
    fields = {"seed-shares": [seed_of[i] for i in state["survivors"]]}
    if state["dropped"]:
        fields["key-shares"] = [key_of[d] for d in state["dropped"]]
    return _reply(msg, context, fields)
