"""The pure parts of secure aggregation (:mod:`shared.secagg`) and its wire allow-list: masks cancel, drop-outs
are recovered from Shamir shares, the quantisation error stays within its stated bound, and only key material of
fixed sizes or a masked update may leave a hospital."""

from __future__ import annotations

import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from shared.model import RetuneModel
from shared.secagg import (CIPHERTEXT_BYTES, CLIP, EXTRAS, MAX_TOTAL_EXAMPLES, QUANTISATION_ERROR, SCALE,
                           SHARE_BYTES, Layout, SecAggError, agree, check_threshold, combine_secret, commitment,
                           decode_sum, decrypt_shares, encode_update, encrypt_shares, mask_update, new_key_pair,
                           prg, public_key, quantise, remove_masks, split_secret, threshold_for)
from shared.wire import (ARRAYS, MASKED, METRICS, NUM_EXAMPLES, SECAGG, SECAGG_CONSISTENCY, SECAGG_MASKED, SECAGG_SETUP,
                         SECAGG_SHARE_KEYS, SECAGG_UNMASK, SITE, WireError, adaptor_spec, check_secure_reply,
                         masked_spec, secure_stage, site_record, to_record)

SESSION = bytes(range(16))
SHAPES = {"a": (3, 4), "b": (5,), "c": (2, 2, 2)}
LAYOUT = Layout.of(SHAPES)


def _update(rng, scale=1.0):
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _exact_average(updates, counts):
    total = sum(counts)
    return {k: sum(u[k].astype(np.float64) * n for u, n in zip(updates, counts)) / total for k in SHAPES}


# --- fixed point ------------------------------------------------------------------------------------------------


def test_layout_round_trip_and_extras_first():
    vector = np.arange(LAYOUT.size, dtype=np.uint64)
    parts = LAYOUT.split(vector)
    assert list(parts)[:len(EXTRAS)] == list(EXTRAS) and all(parts[e].shape == (1,) for e in EXTRAS)
    assert np.array_equal(LAYOUT.join(parts), vector)
    with pytest.raises(SecAggError):
        Layout.of({"num-examples": (1,)})


@pytest.mark.parametrize("seed", range(5))
def test_weighted_average_is_within_the_quantisation_bound(seed):
    rng = np.random.default_rng(seed)
    counts = [int(c) for c in rng.integers(1, 5000, size=int(rng.integers(2, 7)))]
    updates = [_update(rng, scale=10.0 ** rng.uniform(-4, 3)) for _ in counts]
    losses = [float(rng.uniform(0, 3)) for _ in counts]
    total = np.zeros(LAYOUT.size, dtype=np.uint64)
    for u, n, loss in zip(updates, counts, losses):
        total += encode_update(LAYOUT, u, n, loss)
    decoded = decode_sum(LAYOUT, total)
    exact = _exact_average(updates, counts)
    assert decoded.num_examples == sum(counts) and decoded.clipped == 0
    assert abs(decoded.train_loss - np.dot(losses, counts) / sum(counts)) <= QUANTISATION_ERROR
    for k in SHAPES:
        assert np.max(np.abs(decoded.averages[k] - exact[k])) <= QUANTISATION_ERROR + 1e-12


def test_the_bound_is_tight_and_counts_weight_exactly():
    """Values halfway between grid points err by exactly 2^-(f+1); one hospital's weight is an exact integer."""
    half = {k: np.full(s, (7 + 0.5) / SCALE, dtype=np.float64) for k, s in SHAPES.items()}
    decoded = decode_sum(LAYOUT, encode_update(LAYOUT, half, 3, 0.0))
    err = max(np.max(np.abs(decoded.averages[k] - half[k])) for k in SHAPES)
    assert err == QUANTISATION_ERROR
    heavy, light = ({k: np.full(s, v) for k, s in SHAPES.items()} for v in (1.0, -1.0))
    total = encode_update(LAYOUT, heavy, 3, 0.0) + encode_update(LAYOUT, light, 1, 0.0)
    assert all(np.all(v == 0.5) for v in decode_sum(LAYOUT, total).averages.values())


def test_clipping_is_counted_and_bad_input_refused():
    big = {k: np.full(s, 2 * CLIP) for k, s in SHAPES.items()}
    decoded = decode_sum(LAYOUT, encode_update(LAYOUT, big, 2, 0.0))
    assert decoded.clipped == LAYOUT.adaptors.size and all(np.all(v == CLIP) for v in decoded.averages.values())
    q, clipped = quantise(np.array([-CLIP, CLIP, 1.5 / SCALE]))
    assert clipped == 0 and list(q) == [-CLIP * SCALE, CLIP * SCALE, 2]
    with pytest.raises(SecAggError, match="non-finite"):
        encode_update(LAYOUT, {**big, "a": np.full(SHAPES["a"], np.nan)}, 1, 0.0)
    for n in (-1, MAX_TOTAL_EXAMPLES + 1, 2.5, True):
        with pytest.raises(SecAggError):
            encode_update(LAYOUT, big, n, 0.0)
    with pytest.raises(SecAggError, match="do not match"):
        encode_update(LAYOUT, {"a": big["a"]}, 1, 0.0)


def test_the_ring_sum_cannot_wrap_within_the_example_limit():
    """At the extreme (every coordinate at ±CLIP, Σn at the limit) the signed sum still decodes exactly."""
    extreme = {k: np.full(s, -CLIP) for k, s in SHAPES.items()}
    half = MAX_TOTAL_EXAMPLES // 2
    total = encode_update(LAYOUT, extreme, half, 0.0) + encode_update(LAYOUT, extreme, MAX_TOTAL_EXAMPLES - half, 0.0)
    assert all(np.all(v == -CLIP) for v in decode_sum(LAYOUT, total).averages.values())
    over = total + encode_update(LAYOUT, extreme, 1, 0.0)
    with pytest.raises(SecAggError, match="cannot be decoded"):
        decode_sum(LAYOUT, over)


# --- masks ------------------------------------------------------------------------------------------------------


def _parties(n):
    return [{"index": i + 1, "sk1": None, "pk1": None, "seed": os.urandom(32)} for i in range(n)]


def _keys(parties):
    for p in parties:
        p["sk1"], p["pk1"] = new_key_pair()


def _mask(p, parties, x, alive=None):
    peers = {q["index"]: agree(p["sk1"], q["pk1"]) for q in parties
             if q is not p and (alive is None or q["index"] in alive)}
    return mask_update(x, p["index"], SESSION, p["seed"], peers)


def test_pairwise_masks_cancel_and_self_masks_remove():
    rng = np.random.default_rng(0)
    parties = _parties(4)
    _keys(parties)
    xs = [encode_update(LAYOUT, _update(rng), 10 * (i + 1), 0.5) for i in range(4)]
    ys = [_mask(p, parties, x) for p, x in zip(parties, xs)]
    total = sum(ys[1:], ys[0].copy())
    clean = remove_masks(total, SESSION, {p["index"]: p["seed"] for p in parties}, {}, {})
    assert np.array_equal(clean, sum(xs[1:], xs[0].copy()))
    assert not np.array_equal(total, clean)
    # the pairwise masks alone cancel: without self masks the masked sum is the plain sum
    no_self = [y - prg(p["seed"], len(y), b"self/" + SESSION + p["index"].to_bytes(4, "big"))
               for p, y in zip(parties, ys)]
    assert np.array_equal(sum(no_self[1:], no_self[0].copy()), sum(xs[1:], xs[0].copy()))


def test_drop_out_recovery_from_shares():
    """Five parties, threshold 3; party 2 shares its keys and drops before sending its vector, party 4 sends its
    vector but never answers the unmask request. Three survivors' shares rebuild everything needed."""
    rng = np.random.default_rng(1)
    n, t = 5, threshold_for(5)
    assert t == 3
    parties = _parties(n)
    _keys(parties)
    seed_shares = {p["index"]: split_secret(p["seed"], t, n) for p in parties}
    key_shares = {p["index"]: split_secret(p["sk1"], t, n) for p in parties}
    xs = {p["index"]: encode_update(LAYOUT, _update(rng), 7 * p["index"], 1.0) for p in parties}
    survivors = [1, 3, 4, 5]
    dropped = [2]
    ys = {p["index"]: _mask(p, parties, xs[p["index"]]) for p in parties if p["index"] in survivors}
    total = sum(ys.values(), np.zeros(LAYOUT.size, dtype=np.uint64))
    answering = [1, 3, 5]  # party 4 silent at unmask
    seeds = {i: combine_secret([seed_shares[i][a - 1] for a in answering], t) for i in survivors}
    keys = {d: combine_secret([key_shares[d][a - 1] for a in answering], t) for d in dropped}
    assert seeds == {p["index"]: p["seed"] for p in parties if p["index"] in survivors}
    assert public_key(keys[2]) == parties[1]["pk1"]
    pk1 = {p["index"]: p["pk1"] for p in parties if p["index"] in survivors}
    clean = remove_masks(total, SESSION, seeds, keys, pk1)
    assert np.array_equal(clean, sum((xs[i] for i in survivors), np.zeros(LAYOUT.size, dtype=np.uint64)))
    with pytest.raises(SecAggError, match="3 needed"):
        combine_secret([seed_shares[1][0], seed_shares[1][2]], t)


def test_fewer_shares_than_the_threshold_say_nothing_useful():
    secret = os.urandom(32)
    shares = split_secret(secret, 3, 5)
    assert all(len(s) == SHARE_BYTES for s in shares)
    assert combine_secret(shares[2:], 3) == secret
    with pytest.raises(SecAggError):
        combine_secret(shares[:2] + [shares[0]], 3)  # a repeated share adds nothing


def test_prg_is_deterministic_and_label_separated():
    a = prg(b"k" * 32, 1000, b"x")
    assert np.array_equal(a, prg(b"k" * 32, 1000, b"x")) and a.dtype == np.uint64
    assert not np.array_equal(a, prg(b"k" * 32, 1000, b"y"))
    assert np.array_equal(prg(b"k" * 32, 10, b"x"), a[:10])


def test_share_encryption_is_bound_to_session_and_parties():
    sk_a, pk_a = new_key_pair()
    sk_b, pk_b = new_key_pair()
    sk_c, _ = new_key_pair()
    s1, s2 = split_secret(os.urandom(32), 2, 3)[:2]
    ct = encrypt_shares(sk_a, pk_b, SESSION, 1, 2, s1, s2)
    assert len(ct) == CIPHERTEXT_BYTES
    assert decrypt_shares(sk_b, pk_a, SESSION, 1, 2, ct) == (s1, s2)
    for args in ((sk_b, pk_a, bytes(16), 1, 2), (sk_b, pk_a, SESSION, 3, 2), (sk_b, pk_a, SESSION, 1, 3),
                 (sk_c, pk_a, SESSION, 1, 2)):
        with pytest.raises(SecAggError):
            decrypt_shares(*args, ct)
    tampered = ct[:-1] + bytes([ct[-1] ^ 1])
    with pytest.raises(SecAggError):
        decrypt_shares(sk_b, pk_a, SESSION, 1, 2, tampered)


def test_threshold_must_be_a_strict_majority():
    assert [threshold_for(n) for n in (2, 3, 4, 5, 6, 7)] == [2, 2, 3, 3, 4, 4]
    check_threshold(3, 5)
    check_threshold(5, 5)
    for t, n in ((2, 5), (1, 2), (6, 5), (2, 1)):
        with pytest.raises(SecAggError):
            check_threshold(t, n)


def test_commitment_and_low_order_keys():
    seed = os.urandom(32)
    assert commitment(SESSION, 1, seed) != commitment(SESSION, 2, seed) != commitment(bytes(16), 1, seed)
    sk, _ = new_key_pair()
    with pytest.raises(SecAggError):
        agree(sk, bytes(32))  # the all-zero point: no shared secret


# --- the secure allow-list --------------------------------------------------------------------------------------


SPEC = adaptor_spec(RetuneModel(8))
ANNOUNCEMENT = {"pk1": bytes(32), "pk2": bytes(32), "name": "hospital-1", "signature": bytes(103)}


def _masked_reply(**metrics):
    layout = Layout.of({k: s.shape for k, s in SPEC.items()})
    parts = layout.split(prg(b"m" * 32, layout.size, b"test"))
    return RecordDict({MASKED: ArrayRecord({k: Array(v) for k, v in parts.items()}),
                       METRICS: MetricRecord(metrics), SITE: site_record("hospital-1", "cd" * 32)})


def test_secure_stages_are_train_actions():
    assert secure_stage("train.secagg_masked") == SECAGG_MASKED
    assert secure_stage("train") is None and secure_stage("evaluate.secagg_masked") is None
    assert secure_stage("train.other") is None


def test_secure_allow_list_accepts_the_protocol_messages():
    check_secure_reply(_masked_reply(**{"partition-id": 1}), SECAGG_MASKED, SPEC)
    check_secure_reply(RecordDict({SECAGG: ConfigRecord(ANNOUNCEMENT)}), SECAGG_SETUP, None)
    check_secure_reply(RecordDict({SECAGG: ConfigRecord({
        "destinations": [2, 3], "ciphertexts": [bytes(CIPHERTEXT_BYTES)] * 2, "commitment": bytes(32)})}),
        SECAGG_SHARE_KEYS, None)
    check_secure_reply(RecordDict({SECAGG: ConfigRecord({"signature": bytes(64)})}), SECAGG_CONSISTENCY, None)
    check_secure_reply(RecordDict({SECAGG: ConfigRecord({"seed-shares": [bytes(SHARE_BYTES)] * 3,
                                                         "key-shares": [bytes(SHARE_BYTES)]})}), SECAGG_UNMASK, None)
    assert set(masked_spec(SPEC)) == set(SPEC) | set(EXTRAS)


@pytest.mark.parametrize("tamper", ["plain_arrays", "plain_count", "loss_in_clear", "epsilon_in_clear",
                                    "float_vector", "extra_array",
                                    "no_metrics", "long_key", "extra_field", "short_share", "mismatched_lists",
                                    "string_field", "config_in_masked", "free_text_name", "long_signature",
                                    "unsigned"])
def test_secure_allow_list_refuses_anything_else(tamper):
    stage, content = SECAGG_MASKED, _masked_reply()
    if tamper == "plain_arrays":
        content[ARRAYS] = to_record(RetuneModel(8))
    elif tamper == "plain_count":
        content[METRICS] = MetricRecord({NUM_EXAMPLES: 12})
    elif tamper == "loss_in_clear":
        content[METRICS] = MetricRecord({"train-loss": 0.3})
    elif tamper == "epsilon_in_clear":  # a hospital's cumulative ε tells of its other federations
        content[METRICS] = MetricRecord({"epsilon": 2.0, "delta": 1e-5})
    elif tamper in ("float_vector", "extra_array"):
        arrays = {k: a.numpy() for k, a in content[MASKED].items()}
        if tamper == "float_vector":
            name = next(iter(SPEC))
            arrays[name] = arrays[name].astype(np.float64)
        else:
            arrays["embeddings"] = np.zeros(4, dtype=np.uint64)
        content[MASKED] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    elif tamper == "no_metrics":
        del content[METRICS]
    elif tamper == "config_in_masked":
        content[SECAGG] = ConfigRecord({"pk1": bytes(32)})
    else:
        stage = {"long_key": SECAGG_SETUP, "extra_field": SECAGG_SETUP, "string_field": SECAGG_SETUP,
                 "free_text_name": SECAGG_SETUP, "long_signature": SECAGG_SETUP, "unsigned": SECAGG_SETUP,
                 "short_share": SECAGG_UNMASK, "mismatched_lists": SECAGG_SHARE_KEYS}[tamper]
        fields = {"long_key": {**ANNOUNCEMENT, "pk1": bytes(33)},
                  "extra_field": {**ANNOUNCEMENT, "note": b"x"},
                  "string_field": {**ANNOUNCEMENT, "pk2": "leak"},
                  "free_text_name": {**ANNOUNCEMENT, "name": "Jane Doe, born 1961"},
                  "long_signature": {**ANNOUNCEMENT, "signature": bytes(4096)},
                  "unsigned": {k: v for k, v in ANNOUNCEMENT.items() if k != "signature"},
                  "short_share": {"seed-shares": [bytes(SHARE_BYTES - 1)]},
                  "mismatched_lists": {"destinations": [2, 3], "ciphertexts": [bytes(CIPHERTEXT_BYTES)],
                                       "commitment": bytes(32)}}[tamper]
        content = RecordDict({SECAGG: ConfigRecord(fields)})
    with pytest.raises(WireError):
        check_secure_reply(content, stage, SPEC)
