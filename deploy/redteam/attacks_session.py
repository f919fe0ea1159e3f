"""Secure aggregation's consistency check against a server that reuses a session: two set-ups under one session id,
so that signatures a hospital gave in the first count in the second (five hospitals, one colluding)."""

from __future__ import annotations

import inspect
import os

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from deploy.redteam import attack
from deploy.redteam.attacks_rounds import _dim
from deploy.redteam.attacks_secagg import SECURE_RUN, _true_update
from deploy.redteam.bench import Bench, Hospital, brief
from shared.secagg import Layout, SecAggError, agree, combine_secret, decode_sum, pair_mask, public_key, self_mask
from shared.wire import ARRAYS, CONFIG, MASKED, SECAGG

RUN_ID, THRESHOLD = 110, 3


class Refused(Exception):
    """A hospital refused a step of the attack (the reason it gave)."""


def _ask(bench: Bench, hospital: Hospital, stage: str, record: dict, extra: RecordDict | None = None) -> ConfigRecord:
    content = RecordDict({SECAGG: ConfigRecord(record), **dict((extra or RecordDict()).items())})
    reply = hospital.handle(bench.message(hospital, f"train.{stage}", content, RUN_ID))
    if reply.has_error():
        raise Refused(f"{hospital.name} at {stage}: {brief(reply.error.reason, 70)}")
    return reply.content


def _protocol_has_consistency() -> bool:
    from shared import wire

    return hasattr(wire, "SECAGG_CONSISTENCY")


def _set_up(bench: Bench, hospitals: dict[int, Hospital], session: bytes, round_: int, adaptors: ArrayRecord,
            masked_for: list[int], views: dict[int, tuple[list[int], list[int]]]) -> tuple[dict, dict]:
    """One set-up of all hospitals under ``session`` for ``round_``: keys, shares, masked vectors of ``masked_for``,
    and (when the protocol has it) each hospital's signature of the survivor set ``views`` shows it."""
    from shared.secagg import PROTOCOL

    announced = {i: _ask(bench, h, "secagg_setup", {"protocol": PROTOCOL, "session": session, "index": i, "stage": 0,
                                                    "round": round_})[SECAGG] for i, h in hospitals.items()}
    order = sorted(hospitals)
    broadcast = {"session": session, "indices": order, "pk1": [announced[i]["pk1"] for i in order],
                 "pk2": [announced[i]["pk2"] for i in order], "names": [announced[i]["name"] for i in order],
                 "signatures": [announced[i]["signature"] for i in order], "threshold": THRESHOLD}
    ciphertexts = {}
    for i, hospital in hospitals.items():
        shares = _ask(bench, hospital, "secagg_share_keys", broadcast)[SECAGG]
        ciphertexts.update({(i, dst): c for dst, c in zip(shares["destinations"], shares["ciphertexts"])})
    masked = {}
    for i in masked_for:
        sources = [j for j in order if j != i]
        signed = bench.round_content(adaptors, SECURE_RUN, RUN_ID, 0, round_, "train")
        masked[i] = _ask(bench, hospitals[i], "secagg_masked", {
            "session": session, "sources": sources, "ciphertexts": [ciphertexts[(j, i)] for j in sources]},
            RecordDict({ARRAYS: signed[ARRAYS], CONFIG: signed[CONFIG]}))[MASKED]
    signatures = {}
    if _protocol_has_consistency():
        for i, (survivors, dropped) in views.items():
            record = {"session": session, "survivors": survivors, **({"dropped": dropped} if dropped else {})}
            signatures[i] = _ask(bench, hospitals[i], "secagg_consistency", record)[SECAGG]["signature"]
    return masked, signatures


@attack("secagg-session-reuse", "server + 1 peer", "set five hospitals up twice under one session id, harvest "
        "signatures of two different survivor sets from the first set-up, and use them in the second to show H and "
        "A one set (H survived) and B and D another (H dropped), C colluding: rebuild H's self-mask seed and mask key")
def session_reuse(bench: Bench) -> tuple[bool, str]:
    from client.secagg import STATE_KEY
    from shared.identity import load_identity, sign

    hospitals = dict(enumerate(bench.reset()[:5], start=1))
    if len(hospitals) < 5:
        return True, "not applicable here: the bench has fewer than five hospitals"
    for hospital in hospitals.values():
        hospital.join(RUN_ID, SECURE_RUN)
    h, a, b, d, c = 1, 2, 3, 4, 5
    v1, v2 = ([h, a, b, c], [d]), ([a, b, d, c], [h])  # H survived / H dropped
    session = os.urandom(16)
    first = bench.initial(SECURE_RUN, _dim(bench))
    second = ArrayRecord({k: Array(np.asarray(v.numpy()) + np.float32(0.01)) for k, v in first.items()})
    try:
        _, old = _set_up(bench, hospitals, session, 0, first, [a, b], {a: v2, b: v1})
        masked, new = _set_up(bench, hospitals, session, 1, second, list(hospitals),
                              {h: v1, a: v1, b: v2, d: v2})
    except Refused as exc:
        return True, f"refused before any share was revealed ({exc})"
    colluder = dict(hospitals[c].context.state[STATE_KEY].items())  # C hands the server all it holds
    key = load_identity(hospitals[c].node_config["secagg-key"])
    replies = {}
    try:
        for targets, (survivors, dropped), signers in (((h, a), v1, {h: new.get(h), a: new.get(a), b: old.get(b)}),
                                                        ((b, d), v2, {b: new.get(b), d: new.get(d), a: old.get(a)})):
            record = {"session": session, "survivors": survivors, **({"dropped": dropped} if dropped else {})}
            if _protocol_has_consistency():
                from shared.identity import survivors_view

                params = inspect.signature(survivors_view).parameters
                view = survivors_view(colluder["transcript"], survivors, dropped) if "transcript" in params else \
                    survivors_view("retune-secagg/1", RUN_ID, session, survivors, dropped)
                record["signers"] = sorted([*signers, c])
                record["signatures"] = [sign(key, view) if i == c else signers[i] for i in record["signers"]]
            for i in targets:
                replies[i] = _ask(bench, hospitals[i], "secagg_unmask", record)[SECAGG]
    except Refused as exc:
        return True, f"no unmask shares for the inconsistent sets ({exc})"
    return _unmask_alone(bench, hospitals[h], masked[h], colluder, replies, v1, session)


def _unmask_alone(bench: Bench, target: Hospital, masked, colluder: dict, replies: dict, v1, session: bytes
                  ) -> tuple[bool, str]:
    sources = list(colluder["sources"])
    seed_shares = [dict(zip(v1[0], replies[i]["seed-shares"]))[1] for i in (1, 2)]
    key_shares = [replies[i]["key-shares"][0] for i in (3, 4)]
    try:
        seed = combine_secret([*seed_shares, dict(zip(sources, colluder["seed-shares"]))[1]], THRESHOLD)
        sk1 = combine_secret([*key_shares, dict(zip(sources, colluder["key-shares"]))[1]], THRESHOLD)
    except SecAggError as exc:
        return True, f"the shares do not rebuild H's secrets ({exc})"
    keys = dict(zip(colluder["indices"], colluder["pk1s"]))
    if public_key(sk1) != keys[1]:
        return True, "the rebuilt key is not H's"
    layout = Layout.of({k: tuple(a.shape) for k, a in masked.items() if k not in ("num-examples", "train-loss",
                                                                                  "clipped")})
    y = layout.join({k: a.numpy() for k, a in masked.items()})
    y = y - self_mask(seed, session, 1, len(y))
    for j in [i for i in keys if i != 1]:
        mask = pair_mask(agree(sk1, keys[j]), session, 1, j, len(y))
        y = y - mask if j > 1 else y + mask
    update = decode_sum(layout, y)
    _, n = _true_update(bench, target, SECURE_RUN)
    return False, f"{target.name}'s masked update unmasked alone: {update.num_examples} examples (true {n})"
