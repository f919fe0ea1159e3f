"""Secure aggregation against an active server, alone or with a colluding peer: the server runs the protocol's own
code (:mod:`server.secagg`) and manipulates what it sends."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from deploy.redteam import attack
from deploy.redteam.attacks_rounds import PLAIN_RUN, _dim, _train
from deploy.redteam.bench import Bench, Hospital, brief, server_identity
from shared.secagg import Layout, SecAggError, agree, combine_secret, decode_sum, pair_mask, public_key, self_mask
from shared.wire import ARRAYS, MASKED, METRICS, NUM_EXAMPLES, SECAGG

SECURE_RUN = {**PLAIN_RUN, "secure-aggregation": True}


def _secure_round(bench: Bench, hospitals: list[Hospital], run: dict, run_id: int, tamper_of=None, arrays=None):
    """One secure round (stage 1, round 1) with the server's own protocol code, from ``arrays`` (default: the run's
    initial adaptors), its messages rewritten by ``tamper_of(grid)``; returns (result, grid)."""
    from server.secagg import secure_round

    for hospital in hospitals:
        hospital.join(run_id, run)
    grid = bench.grid(hospitals)
    grid.tamper = tamper_of(grid) if tamper_of is not None else None
    start = arrays if arrays is not None else bench.initial(run, _dim(bench))
    content = bench.round_content(start, run, run_id, 0, 0, "train")
    with server_identity(run_id):
        result = secure_round(grid, grid.get_node_ids(), content, 1, timeout=2)  # replies are immediate
    return result, grid


def _total(result) -> dict[str, np.ndarray]:
    """The secure sum as Σ n_i·w_i (the average times the examples)."""
    return {k: a.numpy().astype(np.float64) * result.num_examples for k, a in result.arrays.items()}


def _true_update(bench: Bench, hospital: Hospital, run: dict) -> tuple[dict[str, np.ndarray], int]:
    """What ``hospital`` trains in this round (ground truth: the same training, asked in the clear in a run of its
    own; without DP it is deterministic)."""
    plain = {k: v for k, v in run.items() if k != "secure-aggregation"}
    hospital.join(999, plain)
    reply = _train(bench, hospital, plain, 999)
    return ({k: a.numpy().astype(np.float64) for k, a in reply.content[ARRAYS].items()},
            int(reply.content[METRICS][NUM_EXAMPLES]))


def negative_zero(arrays: ArrayRecord) -> ArrayRecord:
    """The same adaptors with one 0.0 written as -0.0: other bytes (another digest), the same function, the same
    update. ValueError when the adaptors hold no 0.0."""
    out, flipped = {}, False
    for name, array in arrays.items():
        values = np.array(array.numpy())
        if not flipped and np.any(values == 0):
            values.flat[int(np.flatnonzero(values == 0)[0])] = -0.0
            flipped = True
        out[name] = Array(values)
    if not flipped:
        raise ValueError("the adaptors hold no 0.0 to write as -0.0")
    return ArrayRecord(out)


@attack("secagg-rerun-subtract", "server", "run a secure round with every hospital, run it again without H under a "
        "new run identity (another run-dir) from the same global adaptors written with a -0.0 for a 0.0 (other bytes, "
        "the same function), and subtract the sums (no DP: training repeats exactly)")
def rerun_subtract(bench: Bench) -> tuple[bool, str]:
    hospitals = bench.reset()
    target = hospitals[0]
    first, _ = _secure_round(bench, hospitals, {**SECURE_RUN, "run-dir": "runs/study"}, 60)
    if first.arrays is None:
        return True, f"not applicable here: no first sum ({first.failure})"
    rerun = {**SECURE_RUN, "run-dir": "runs/study-again"}
    again, grid = _secure_round(bench, hospitals[1:], rerun, 61,
                                arrays=negative_zero(bench.initial(rerun, _dim(bench))))
    if again.arrays is None:
        refusals = [r.error.reason for _, _, r in grid.received if r.has_error()]
        return True, f"no second sum: {len(refusals)} refusal(s) ({brief((refusals or [again.failure])[0], 80)})"
    recovered = {k: v - _total(again)[k] for k, v in _total(first).items()}
    count = first.num_examples - again.num_examples
    truth, n = _true_update(bench, target, {**SECURE_RUN, "run-dir": "runs/study"})
    error = max(float(np.max(np.abs(recovered[k] / max(count, 1) - truth[k]))) for k in truth)
    return False, f"{target.name}'s update recovered to {error:.1e} (its example count: {count}, true {n})"


@attack("secagg-inconsistent-views", "server + 1 peer", "tell H that H and C survived and A dropped, and A that A "
        "and C survived and H dropped (C colludes: it signs and reveals everything), then rebuild H's self-mask seed "
        "and mask key from the shares (3 hospitals, threshold 2)")
def inconsistent_views(bench: Bench) -> tuple[bool, str]:
    from client.secagg import STATE_KEY
    from shared.identity import load_identity, sign

    hospitals = bench.reset()[:3]
    target, honest, colluder = hospitals
    index = {h.node_id: k + 1 for k, h in enumerate(sorted(hospitals, key=lambda h: h.node_id))}
    views = {target.node_id: ([target, colluder], [honest]), honest.node_id: ([honest, colluder], [target]),
             colluder.node_id: ([target, honest, colluder], [])}
    captured: dict[str, object] = {}
    consistency = any(kind.endswith("secagg_consistency") for kind in _protocol_stages())

    def tamper_of(grid):
        def tamper(msg: Message) -> Message | None:
            stage, node = msg.metadata.message_type.partition(".")[2], msg.metadata.dst_node_id
            if stage == "secagg_masked":
                captured["arrays"] = msg.content[ARRAYS]
            if stage not in ("secagg_consistency", "secagg_unmask"):
                return msg
            if "colluder" not in captured:  # the colluding peer hands the server everything it holds
                captured["colluder"] = dict(colluder.context.state[STATE_KEY].items())
            record = dict(msg.content[SECAGG].items())
            survivors, dropped = (sorted(index[h.node_id] for h in group) for group in views[node])
            record["survivors"] = survivors
            record.pop("dropped", None)
            if dropped:
                record["dropped"] = dropped
            if stage == "secagg_unmask" and consistency:  # its own signature and the colluder's, of its set
                from shared.identity import survivors_view

                own = next(r.content[SECAGG]["signature"] for kind, k, r in grid.received
                           if kind.endswith("secagg_consistency") and hospitals[k].node_id == node
                           and not r.has_error())
                view = survivors_view(captured["colluder"]["transcript"], survivors, dropped)
                record["signers"] = [index[node], index[colluder.node_id]]
                record["signatures"] = [own, sign(load_identity(colluder.node_config["secagg-key"]), view)]
            return Message(RecordDict({SECAGG: ConfigRecord(record)}), dst_node_id=node,
                           message_type=msg.metadata.message_type, group_id=msg.metadata.group_id)

        return tamper

    _, grid = _secure_round(bench, hospitals, {**SECURE_RUN, "run-dir": "runs/views"}, 70, tamper_of)
    replies = {(kind.partition(".")[2], k): r for kind, k, r in grid.received}
    unmask = {k: r for (stage, k), r in replies.items() if stage == "secagg_unmask"}
    return _rebuild(target, honest, colluder, index, captured, replies, unmask)


def _protocol_stages() -> tuple[str, ...]:
    """The stages of the installed protocol (the attack follows whichever the hospitals speak)."""
    from shared import wire

    return tuple(getattr(wire, "SECURE_STAGES", ()))


def _rebuild(target: Hospital, honest: Hospital, colluder: Hospital, index: dict[int, int], captured: dict,
             replies: dict, unmask: dict) -> tuple[bool, str]:
    """The server's arithmetic: H's self-mask seed from H's own share and C's, H's mask key from A's share and
    C's, then H's masked vector unmasked alone."""
    mine, theirs = unmask.get(target.index), unmask.get(honest.index)
    if mine is None or theirs is None or mine.has_error() or theirs.has_error():
        why = next((r.error.reason for r in (mine, theirs) if r is not None and r.has_error()), "no answer")
        return True, f"no unmask shares from the honest hospitals ({brief(why)})"
    state = captured["colluder"]
    sources = list(state["sources"])
    colluder_seed = dict(zip(sources, state["seed-shares"]))
    colluder_key = dict(zip(sources, state["key-shares"]))
    h = index[target.node_id]
    survivors = sorted([h, index[colluder.node_id]])
    seed_share = dict(zip(survivors, mine.content[SECAGG]["seed-shares"]))[h]
    key_share = theirs.content[SECAGG]["key-shares"][0]
    try:
        seed = combine_secret([seed_share, colluder_seed[h]], 2)
        sk1 = combine_secret([key_share, colluder_key[h]], 2)
    except SecAggError as exc:
        return True, f"the shares do not rebuild H's secrets ({exc})"
    layout = Layout.of({k: tuple(a.shape) for k, a in captured["arrays"].items()})
    masked = replies[("secagg_masked", target.index)].content[MASKED]
    y = layout.join({k: a.numpy() for k, a in masked.items()})
    session = bytes(state["session"])
    y = y - self_mask(seed, session, h, len(y))
    keys = dict(zip(state["indices"], state["pk1s"]))
    for j in [i for i in state["indices"] if i != h]:
        mask = pair_mask(agree(sk1, keys[j]), session, h, j, len(y))
        y = y - mask if j > h else y + mask  # H added its masks with peers above it, subtracted the others
    if public_key(sk1) != keys[h]:
        return True, "the rebuilt key is not H's"
    update = decode_sum(layout, y)
    return False, (f"{target.name}'s masked update unmasked alone: {update.num_examples} examples, adaptors "
                   f"{sorted(update.averages)[:2]}…")


@attack("secagg-key-substitution", "server", "relay the server's own X25519 keys under a member hospital's name (and "
        "its signature) at key sharing, to decrypt the shares meant for it")
def key_substitution(bench: Bench) -> tuple[bool, str]:
    from shared.secagg import new_key_pair

    hospitals = bench.reset()[:3]

    def tamper_of(grid):
        def tamper(msg: Message) -> Message | None:
            if not msg.metadata.message_type.endswith("secagg_share_keys"):
                return msg
            record = dict(msg.content[SECAGG].items())
            pk1, pk2 = list(record["pk1"]), list(record["pk2"])
            pk1[1], pk2[1] = new_key_pair()[1], new_key_pair()[1]  # keys the server holds, under hospital 1's name
            record.update(pk1=pk1, pk2=pk2)
            return Message(RecordDict({SECAGG: ConfigRecord(record)}), dst_node_id=msg.metadata.dst_node_id,
                           message_type=msg.metadata.message_type, group_id=msg.metadata.group_id)

        return tamper

    _, grid = _secure_round(bench, hospitals, {**SECURE_RUN, "run-dir": "runs/substitute"}, 80, tamper_of)
    shares = [r for kind, _, r in grid.received if kind.endswith("secagg_share_keys") and not r.has_error()]
    return not shares, (f"{len(shares)} hospital(s) encrypted their shares to the substituted keys" if shares else
                        "every hospital refused the substituted keys: no share was encrypted")


@attack("secagg-second-mask", "server", "mid-round, after its masked vector, ask a hospital for a second masked "
        "vector in the same session (two vectors under the same masks give away the difference of two updates), and "
        "set the session up again to get one under new keys")
def second_mask(bench: Bench) -> tuple[bool, str]:
    hospitals = bench.reset()[:3]
    captured: dict[str, Message] = {}

    def tamper_of(grid):
        def tamper(msg: Message) -> Message | None:
            stage = msg.metadata.message_type.partition(".")[2]
            if msg.metadata.dst_node_id == hospitals[0].node_id:
                captured.setdefault(stage, msg)
            return None if stage in ("secagg_consistency", "secagg_unmask") else msg  # the round stops mid-way

        return tamper

    _secure_round(bench, hospitals, {**SECURE_RUN, "run-dir": "runs/again"}, 90, tamper_of)
    target = hospitals[0]

    def resend(stage: str) -> Message:
        sent = captured[stage]
        return target.handle(bench.message(target, sent.metadata.message_type, RecordDict(dict(sent.content.items())),
                                           90))

    leaked = []
    if not resend("secagg_masked").has_error():
        leaked.append("a second masked vector under the session's masks")
    again = resend("secagg_setup")
    if not again.has_error() and not resend("secagg_masked").has_error():
        leaked.append("a masked vector after setting the session up again")
    said = f"the session set up again: {'refused' if again.has_error() else 'allowed (new keys, nothing masked)'}"
    return not leaked, ("; ".join(leaked) if leaked else f"a second masked vector refused; {said}")
