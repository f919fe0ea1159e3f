"""Secure aggregation, the pure parts: fixed-point encoding on the ring Z/2^64, masks, key agreement, secret shares.

The protocol is SecAgg (Bonawitz et al., CCS 2017) in the four stages Flower's SecAgg+ uses plus the paper's
consistency check against an active server, over a complete graph (every hospital shares with every other; a
consortium has a handful of hospitals, not thousands of phones):

1. **setup** (``train.secagg_setup``): each hospital makes two fresh X25519 key pairs for the round, ``(sk1, pk1)``
   for the pairwise masks and ``(sk2, pk2)`` for encrypting shares, and sends the public keys, signed with its
   long-term identity key (:mod:`shared.identity`). Nothing else is kept across sessions.
2. **share keys** (``train.secagg_share_keys``): the server broadcasts everyone's signed announcements and the
   threshold ``t``; each hospital checks every signature against the consortium's roster (at least
   :data:`MIN_PARTICIPANTS` members, none twice), then draws a self-mask seed ``b``, splits ``b`` and ``sk1`` into Shamir shares (``t`` of ``n``
   reconstruct), encrypts each peer's pair of shares for that peer (ChaCha20-Poly1305 under an X25519/HKDF key, the
   session and both indices bound as associated data) and sends the ciphertexts (the server only relays them) and a
   hash commitment to ``b``.
3. **masked vectors** (``train.secagg_masked``): the server forwards the ciphertexts with the global adaptors; each
   hospital trains, encodes ``x = (n·q(w), n, n·q(loss), #clipped)`` on Z/2^64 and sends
   ``y = x + PRG(b) + Σ_{j>i} PRG(s_ij) − Σ_{j<i} PRG(s_ij)`` where ``s_ij = X25519(sk1_i, pk1_j)``. Without ``b``
   every ``y`` is uniform on the ring, whatever the update.
4. **consistency** (``train.secagg_consistency``): the server names the survivors S (whose ``y`` it holds) and the
   dropped D (shared keys, sent no ``y``); each survivor checks the sets and signs them with its identity key, once
   per session, after recording that its update may be summed with exactly S, ever (:mod:`client.secagg_record`).
5. **unmask** (``train.secagg_unmask``): the server relays the signatures; each survivor that sees more than
   (n + c) / 2 of them over exactly the sets it signed (c: the peers it assumes collude with the server) returns its
   shares of ``b_i`` for i ∈ S and of ``sk1_d`` for d ∈ D, never both for the same hospital, and only once per
   round. With ``t`` shares the server removes the self masks of S and the pairwise masks survivors added for the
   dropped; pairwise masks between survivors cancel in the sum.

**Why not Flower's SecAgg+ as is** (``SecAggPlusWorkflow`` + ``secaggplus_mod``): it drives the legacy strategy API
(``LegacyContext``, ``configure_fit``/``aggregate_fit`` with ``FitRes``, a client manager), its client mod converts
our Message-API replies through ``recorddict_compat`` and runs outside the hospital boundary guard, and it cannot
report what each hospital sent. Its mask PRG also folds the 32-byte seed to a 32-bit ``RandomState`` seed (a space
a server can search) and draws ``randint(0, 2^32 − 1)``, which never yields the top value, and its weighting
quantises ``n/max_weight``. So the stages are ours, on the Message API, with a ChaCha20 keystream as PRG and exact
integer weights; Flower's Shamir sharing (:func:`flwr.common.secure_aggregation.crypto.shamir.create_shares` /
``combine_shares``, pycryptodome over GF(2^128)) is reused as is.

**Weighted FedAvg and the quantisation bound.** Each coordinate ``w`` is clipped to ``[−CLIP, CLIP]`` and rounded to
the nearest multiple of ``2^−FRACTION_BITS``: ``q(w) = rint(w·2^f)``, so ``|q(w)/2^f − w| ≤ 2^−(f+1)``. A hospital
sends ``n_i·q(w_i)`` (exact integer weights); the server divides the unmasked integer sum by ``2^f·Σ n_i``, so

    |secure average − Σ n_i w_i / Σ n_i|  =  |Σ n_i e_i| / Σ n_i  ≤  max |e_i|  ≤  2^−(f+1) = 2^−25 ≈ 2.98e−8

per coordinate (:data:`QUANTISATION_ERROR`), for every coordinate no hospital clipped (the clipped count is summed
too), before the result is stored as float32 (half an ulp more: ``|x|·2^−24``) and up to float64 rounding of the
division (below 1e−12). The integer sum cannot wrap: ``|Σ n_i q_i| ≤ Σ n_i·CLIP·2^f < 2^63`` whenever
``Σ n_i ≤ MAX_TOTAL_EXAMPLES`` (2^27 − 1), which the server checks on the unmasked ``Σ n_i``. The mean train
loss travels the same way; ``Σ n_i`` is exact.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

from shared.errors import RetuneError

PROTOCOL = "retune-secagg/1"
#: Fixed point: ``2^-FRACTION_BITS`` resolution, values clipped to ``[-CLIP, CLIP]``, ring Z/2^64 (numpy uint64).
FRACTION_BITS = 24
CLIP = 4096.0
SCALE = 1 << FRACTION_BITS
#: Per-coordinate bound of |secure average − exact weighted average| (see the module docstring).
QUANTISATION_ERROR = 2.0 ** -(FRACTION_BITS + 1)
#: Largest Σ n_i for which the integer sum cannot wrap around the signed 64-bit range.
MAX_TOTAL_EXAMPLES = (2**63 - 1) // (int(CLIP) * SCALE)
#: Masked coordinates besides the adaptors: examples, example-weighted train loss, clipped coordinates.
NUM_EXAMPLES, TRAIN_LOSS, CLIPPED = "num-examples", "train-loss", "clipped"
EXTRAS = (NUM_EXAMPLES, TRAIN_LOSS, CLIPPED)

KEY_BYTES = 32        # X25519 private and public keys
SEED_BYTES = 32       # self-mask seed b
SESSION_BYTES = 16    # fresh per round, chosen by the server
COMMITMENT_BYTES = 32
SHARE_BYTES = 4 + 48  # Flower's share of a 32-byte secret: 4-byte index + 3 padded 16-byte chunks
NONCE_BYTES = 12
CIPHERTEXT_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + 16
MAX_PARTICIPANTS = 1000
#: Fewest hospitals secure aggregation runs with: with two, each learns the other's update from the sum.
MIN_PARTICIPANTS = 3


class SecAggError(RetuneError):
    """A secure-aggregation step that cannot go on safely (bad keys, bad shares, a threshold too low, overflow)."""


# --- fixed-point encoding --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Order and shapes of the coordinates a hospital masks: the extras (one each), then the adaptor arrays by
    name. Server and hospitals build it from the same global adaptors, so they agree without sending it."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, arrays: Mapping[str, tuple[int, ...]]) -> Layout:
        """From adaptor names → shapes (``{k: a.shape for k, a in record.items()}``)."""
        clash = sorted(set(arrays) & set(EXTRAS))
        if clash:
            raise SecAggError(f"adaptor arrays may not be named {clash}")
        return cls(tuple((name, (1,)) for name in EXTRAS) + tuple((k, tuple(arrays[k])) for k in sorted(arrays)))

    @property
    def adaptors(self) -> Layout:
        """The adaptor arrays alone (without the extras)."""
        return Layout(tuple((name, shape) for name, shape in self.shapes if name not in EXTRAS))

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.shapes)

    def split(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """A flat vector as named arrays."""
        if vector.shape != (self.size,):
            raise SecAggError(f"a vector of {vector.shape} does not fit a layout of {self.size} coordinates")
        out, start = {}, 0
        for name, shape in self.shapes:
            stop = start + int(np.prod(shape))
            out[name] = vector[start:stop].reshape(shape)
            start = stop
        return out

    def join(self, arrays: Mapping[str, np.ndarray], dtype=np.uint64) -> np.ndarray:
        """Named arrays as one flat vector (names and shapes must match exactly)."""
        if set(arrays) != {name for name, _ in self.shapes}:
            raise SecAggError(f"arrays {sorted(arrays)} do not match the layout")
        parts = [np.zeros(0, dtype=dtype)]
        for name, shape in self.shapes:
            array = np.asarray(arrays[name])
            if array.shape != shape:
                raise SecAggError(f"array {name!r} has shape {array.shape}, expected {shape}")
            parts.append(array.reshape(-1).astype(dtype, copy=False))
        return np.concatenate(parts)


def quantise(values: np.ndarray) -> tuple[np.ndarray, int]:
    """``rint(clip(values)·2^f)`` as int64, and how many values were clipped. Non-finite values are refused."""
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise SecAggError("the update holds non-finite values; it cannot be aggregated")
    clipped = int(np.count_nonzero(np.abs(values) > CLIP))
    return np.rint(np.clip(values, -CLIP, CLIP) * SCALE).astype(np.int64), clipped


def encode_update(layout: Layout, arrays: Mapping[str, np.ndarray], num_examples: int,
                  train_loss: float) -> np.ndarray:
    """A hospital's contribution on Z/2^64: ``n·q(w)`` for every adaptor coordinate, ``n``, ``n·q(loss)`` and the
    number of clipped coordinates (uint64, two's complement)."""
    if isinstance(num_examples, bool) or int(num_examples) != num_examples or not \
            0 <= num_examples <= MAX_TOTAL_EXAMPLES:
        raise SecAggError(f"num-examples {num_examples!r} is not an integer in [0, {MAX_TOTAL_EXAMPLES}]")
    n = np.int64(num_examples)
    q, clipped = quantise(layout.adaptors.join(arrays, dtype=np.float64))
    loss_q, loss_clipped = quantise(np.array([train_loss]))
    extras = np.array([n, n * loss_q[0], clipped + loss_clipped], dtype=np.int64)
    return np.concatenate([extras, n * q]).view(np.uint64)


@dataclass(frozen=True)
class Decoded:
    """The unmasked sum, decoded: weighted averages (float64), Σ n_i, weighted mean loss, clipped coordinates."""

    averages: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    clipped: int


def decode_sum(layout: Layout, total: np.ndarray) -> Decoded:
    """Turn the unmasked sum of :func:`encode_update` vectors into example-weighted averages."""
    signed = np.asarray(total, dtype=np.uint64).view(np.int64)
    n, loss_sum, clipped = (int(v) for v in signed[:len(EXTRAS)])
    if not 0 < n <= MAX_TOTAL_EXAMPLES:
        raise SecAggError(f"the sum holds {n} examples; outside (0, {MAX_TOTAL_EXAMPLES}] it cannot be decoded "
                          "(no examples, or the masks were not removed)")
    if clipped < 0:
        raise SecAggError("the clipped count is negative: the masks were not removed")
    denominator = float(n) * SCALE
    averages = {name: (part.astype(np.float64) / denominator)
                for name, part in layout.split(signed).items() if name not in EXTRAS}
    return Decoded(averages, n, loss_sum / denominator, clipped)


# --- masks ------------------------------------------------------------------------------------------------------


def _index(i: int) -> bytes:
    return int(i).to_bytes(4, "big")


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"{PROTOCOL}/".encode() + info).derive(secret)


def prg(seed: bytes, length: int, label: bytes) -> np.ndarray:
    """``length`` uniform elements of Z/2^64: the ChaCha20 keystream under ``HKDF(seed, label)``."""
    key = _hkdf(seed, b"prg/" + label)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def self_mask(seed: bytes, session: bytes, index: int, length: int) -> np.ndarray:
    """The mask only hospital ``index`` knows (until its seed is reconstructed from shares)."""
    return prg(seed, length, b"self/" + session + _index(index))


def pair_mask(secret: bytes, session: bytes, i: int, j: int, length: int) -> np.ndarray:
    """The mask hospitals ``i`` and ``j`` share (symmetric in i, j)."""
    lo, hi = sorted((i, j))
    return prg(secret, length, b"pair/" + session + _index(lo) + _index(hi))


def mask_update(x: np.ndarray, index: int, session: bytes, seed: bytes,
                pair_secrets: Mapping[int, bytes]) -> np.ndarray:
    """``x + PRG(b) + Σ_{j>i} PRG(s_ij) − Σ_{j<i} PRG(s_ij)`` on Z/2^64."""
    y = np.asarray(x, dtype=np.uint64) + self_mask(seed, session, index, len(x))
    for j, secret in pair_secrets.items():
        if j == index:
            raise SecAggError("a hospital has no pairwise mask with itself")
        mask = pair_mask(secret, session, index, j, len(x))
        y = y + mask if j > index else y - mask
    return y


def remove_masks(total: np.ndarray, session: bytes, seeds: Mapping[int, bytes],
                 dropped_keys: Mapping[int, bytes], survivor_keys: Mapping[int, bytes]) -> np.ndarray:
    """Sum of the survivors' masked vectors → sum of their updates.

    ``seeds``: reconstructed self-mask seed of every survivor; ``dropped_keys``: reconstructed ``sk1`` of every
    hospital that shared keys but sent no vector; ``survivor_keys``: ``pk1`` of every survivor."""
    total = np.asarray(total, dtype=np.uint64).copy()
    length = len(total)
    for i, seed in seeds.items():
        total -= self_mask(seed, session, i, length)
    for d, sk1 in dropped_keys.items():
        for i, pk1 in survivor_keys.items():
            mask = pair_mask(agree(sk1, pk1), session, i, d, length)
            total = total - mask if d > i else total + mask  # survivor i added +mask for d > i, −mask for d < i
    return total


# --- keys, shares, encryption -----------------------------------------------------------------------------------


def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes ``(private, public)``."""
    sk = X25519PrivateKey.generate()
    return (sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def public_key(private: bytes) -> bytes:
    """The X25519 public key of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes) -> bytes:
    """X25519 shared secret (refuses low-order public keys)."""
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecAggError(f"key agreement failed: {exc}") from None


def threshold_for(participants: int) -> int:
    """The threshold the server uses: a strict majority of the hospitals that shared keys (at least 2)."""
    return max(2, participants // 2 + 1)


def check_threshold(threshold: int, participants: int) -> None:
    """A hospital's check of the server's threshold: a strict majority, so no two disjoint sets of answering
    hospitals can reveal both the self-mask seed and the mask key of one hospital."""
    if not MIN_PARTICIPANTS <= participants <= MAX_PARTICIPANTS:
        raise SecAggError(f"{participants} hospitals: secure aggregation needs {MIN_PARTICIPANTS} to "
                          f"{MAX_PARTICIPANTS}")
    if not threshold_for(participants) <= threshold <= participants:
        raise SecAggError(f"threshold {threshold} of {participants} hospitals is not a strict majority")


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shamir shares of ``secret`` (Flower's ``create_shares``): share ``k`` (0-based) has x-coordinate ``k+1``."""
    if len(secret) != SEED_BYTES:
        raise SecAggError(f"secrets are {SEED_BYTES} bytes")
    shares = create_shares(secret, threshold, count)
    assert all(len(s) == SHARE_BYTES for s in shares)
    return shares


def combine_secret(shares: list[bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares with distinct x-coordinates (Flower's ``combine_shares``)."""
    distinct = {s[:4]: s for s in shares if len(s) == SHARE_BYTES}
    if len(distinct) < threshold:
        raise SecAggError(f"{len(distinct)} distinct shares, {threshold} needed")
    try:
        secret = combine_shares([distinct[k] for k in sorted(distinct)[:threshold]])
    except ValueError as exc:
        raise SecAggError(f"the shares do not combine: {exc}") from None
    if len(secret) != SEED_BYTES:
        raise SecAggError("the shares do not combine to a secret")
    return secret


def commitment(session: bytes, index: int, seed: bytes) -> bytes:
    """What a hospital publishes about its self-mask seed, so the server can check a reconstruction."""
    return hashlib.sha256(f"{PROTOCOL}/commit/".encode() + session + _index(index) + seed).digest()


def _share_cipher(private: bytes, peer_public: bytes, session: bytes, i: int, j: int) -> ChaCha20Poly1305:
    lo, hi = sorted((i, j))
    return ChaCha20Poly1305(_hkdf(agree(private, peer_public), b"shares/" + session + _index(lo) + _index(hi)))


def encrypt_shares(sk2: bytes, peer_pk2: bytes, session: bytes, src: int, dst: int,
                   seed_share: bytes, key_share: bytes) -> bytes:
    """Encrypt ``src``'s shares for ``dst``; the server relays the ciphertext and cannot read or redirect it."""
    if len(seed_share) != SHARE_BYTES or len(key_share) != SHARE_BYTES:
        raise SecAggError("malformed shares")
    nonce = os.urandom(NONCE_BYTES)
    aad = session + _index(src) + _index(dst)
    return nonce + _share_cipher(sk2, peer_pk2, session, src, dst).encrypt(nonce, seed_share + key_share, aad)


def decrypt_shares(sk2: bytes, peer_pk2: bytes, session: bytes, src: int, dst: int,
                   ciphertext: bytes) -> tuple[bytes, bytes]:
    """``(seed share, key share)`` that ``src`` encrypted for ``dst`` in this session, or :class:`SecAggError`."""
    if len(ciphertext) != CIPHERTEXT_BYTES:
        raise SecAggError(f"a share ciphertext from {src} has the wrong size")
    aad = session + _index(src) + _index(dst)
    try:
        plain = _share_cipher(sk2, peer_pk2, session, src, dst).decrypt(
            ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SecAggError(f"the shares relayed from {src} were not encrypted by {src} for {dst} in this round") \
            from None
    return plain[:SHARE_BYTES], plain[SHARE_BYTES:]
