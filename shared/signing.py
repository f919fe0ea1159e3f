"""Consortium signatures (Ed25519): on the final checkpoint and on the global adaptors of every round.

The consortium holds one key pair: the server signs with ``consortium.key`` (PEM PKCS8, mode 0600), every
hospital and every ``retune evaluate``/``predict`` user verifies with ``consortium.pub`` (PEM SubjectPublicKeyInfo).

- A checkpoint's ``adaptors.sig`` (JSON) signs ``sha256(DOMAIN_CKPT + sha256(adaptors.safetensors) +
  sha256(adaptors.json))``: tampering with either file, or swapping bytes between them, breaks it. The sidecar
  records the backbone identity and, for a federation, the run (its identity, settings, Flower run id, rounds);
  the signature file lists what it covers (``covers``).
- A round's message is signed over :func:`round_digest`: Flower's run id, the run's identity (the hash of its run
  config, :func:`shared.config.run_identity`), stage, round and message kind (train or evaluate), together with
  :func:`arrays_digest` of the global adaptors (array names, dtypes, shapes and raw C-order bytes, in name order:
  independent of how the arrays are serialised). The 64-byte signature travels to the hospitals in the ``config``
  record under :data:`ARRAYS_SIGNATURE`; a signed round cannot be replayed into another run, stage, round or kind.
- The server's run folder is sealed after every round (:func:`seal`): ``state.json`` with the hashes of the files
  it names, so a resumption refuses a folder changed since.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ArrayRecord

from shared.checkpoint import SIDECAR, WEIGHTS
from shared.errors import RetuneError

PRIVATE_KEY = "consortium.key"
PUBLIC_KEY = "consortium.pub"
SIGNATURE = "adaptors.sig"
#: ConfigRecord key under which the server sends the signature of the message's ``arrays``.
ARRAYS_SIGNATURE = "arrays-signature"
ALGORITHM = "ed25519"
_DOMAIN_CKPT = b"retune-fl/checkpoint/v1\n"
_DOMAIN_ARRAYS = b"retune-fl/arrays/v1\n"
_DOMAIN_ROUND = b"retune-fl/round/v1\n"
_DOMAIN_SEAL = b"retune-fl/run-state/v1\n"

PrivateKeyLike = Union[Ed25519PrivateKey, Path, str]
PublicKeyLike = Union[Ed25519PublicKey, Path, str]


class SignatureError(RetuneError):
    """A missing, malformed or wrong signature, or signed content that was changed."""


def generate_keys(out: Path, force: bool = False) -> tuple[Path, Path]:
    """Write a new consortium key pair into ``out``; returns (private, public) paths. Refuses to overwrite."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / PRIVATE_KEY, out / PUBLIC_KEY
    if not force and (key_path.exists() or pub_path.exists()):
        raise RetuneError(f"{out} already holds a consortium key pair; pass --force to replace it "
                          "(every hospital then needs the new consortium.pub)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    key_path.unlink(missing_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(key_path, 0o600)  # whatever the umask
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path


def load_private_key(key: PrivateKeyLike) -> Ed25519PrivateKey:
    """An Ed25519 private key, or the one in a PEM file."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    try:
        loaded = serialization.load_pem_private_key(_read(Path(key), "private key"), password=None)
    except (ValueError, TypeError):
        loaded = None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise RetuneError(f"{key} is not an Ed25519 private key in PEM (write one with `retune keys --out DIR`)")
    return loaded


def load_public_key(key: PublicKeyLike) -> Ed25519PublicKey:
    """An Ed25519 public key, or the one in a PEM file."""
    if isinstance(key, Ed25519PublicKey):
        return key
    try:
        loaded = serialization.load_pem_public_key(_read(Path(key), "public key"))
    except ValueError:
        loaded = None
    if not isinstance(loaded, Ed25519PublicKey):
        raise RetuneError(f"{key} is not an Ed25519 public key in PEM (the consortium.pub `retune keys` wrote)")
    return loaded


def key_id(key: PublicKeyLike | Ed25519PrivateKey) -> str:
    """A short fingerprint of a key pair: the first 16 hex digits of sha256(raw public key)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else load_public_key(key)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def checkpoint_digest(folder: Path) -> bytes:
    """What a checkpoint signature covers: both files, each hashed, under a domain tag."""
    folder = Path(folder)
    parts = [hashlib.sha256(_read(folder / name, "checkpoint file")).digest() for name in (WEIGHTS, SIDECAR)]
    return hashlib.sha256(_DOMAIN_CKPT + b"".join(parts)).digest()


def sign_checkpoint(folder: Path, private_key: PrivateKeyLike) -> Path:
    """Write ``adaptors.sig`` next to the checkpoint's weights and sidecar; returns its path."""
    key = load_private_key(private_key)
    digest = checkpoint_digest(folder)
    body = {"algorithm": ALGORITHM, "key_id": key_id(key), "digest": digest.hex(),
            "covers": [WEIGHTS, f"{SIDECAR} (backbone identity, prompts, adaptor shape and, for a federation, the "
                                "run: its identity, settings, Flower run id and rounds)"],
            "signature": base64.b64encode(key.sign(digest)).decode()}
    path = Path(folder) / SIGNATURE
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def verify_checkpoint(folder: Path, public_key: PublicKeyLike) -> None:
    """Raise :class:`SignatureError` unless ``adaptors.sig`` is the consortium's signature of these files."""
    folder = Path(folder)
    key = load_public_key(public_key)
    path = folder / SIGNATURE
    if not path.is_file():
        raise SignatureError(f"{folder} has no {SIGNATURE}: this checkpoint is not signed by the consortium")
    try:
        body: dict[str, Any] = json.loads(path.read_text())
        signature = base64.b64decode(body["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"{path} is not a valid signature file: {exc}") from exc
    if body.get("algorithm") != ALGORITHM:
        raise SignatureError(f"{path}: algorithm {body.get('algorithm')!r} is not {ALGORITHM}")
    if body.get("key_id") not in (None, key_id(key)):
        raise SignatureError(f"{folder} was signed by key {body.get('key_id')}, not by the given consortium "
                             f"key {key_id(key)}")
    try:
        key.verify(signature, checkpoint_digest(folder))
    except InvalidSignature:
        raise SignatureError(f"{folder}: the signature does not match {WEIGHTS} and {SIDECAR}; the checkpoint "
                             "was changed after signing (or signed by another key)") from None


def arrays_digest(record: ArrayRecord) -> bytes:
    """Canonical sha256 of an ArrayRecord: per array in name order its name, dtype, shape and raw bytes."""
    h = hashlib.sha256(_DOMAIN_ARRAYS)
    for name in sorted(record.keys()):
        try:
            values = np.ascontiguousarray(record[name].numpy())
        except (TypeError, ValueError) as exc:
            raise SignatureError(f"array {name!r} cannot be read as a NumPy array: {exc}") from exc
        header = json.dumps([name, values.dtype.str, list(values.shape)]).encode()
        h.update(len(header).to_bytes(8, "big") + header)
        h.update(values.nbytes.to_bytes(8, "big") + values.tobytes())
    return h.digest()


@dataclass(frozen=True)
class RoundBinding:
    """What a round's signature binds besides the arrays: Flower's run id, the run's identity, stage, round and
    message kind (``train`` or ``evaluate``)."""

    run_id: int
    run: str
    stage: int
    round: int
    kind: str


def round_digest(record: ArrayRecord, binding: RoundBinding) -> bytes:
    """What a round's signature covers: the binding and :func:`arrays_digest` under a domain tag."""
    head = json.dumps([binding.run_id, binding.run, binding.stage, binding.round, binding.kind]).encode()
    return hashlib.sha256(_DOMAIN_ROUND + len(head).to_bytes(8, "big") + head + arrays_digest(record)).digest()


def sign_round(record: ArrayRecord, binding: RoundBinding, key: PrivateKeyLike) -> bytes:
    """The 64-byte Ed25519 signature of :func:`round_digest`."""
    return load_private_key(key).sign(round_digest(record, binding))


def verify_round(record: ArrayRecord, binding: RoundBinding, signature: bytes | None, public_key: PublicKeyLike
                 ) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is the consortium's signature of these arrays for exactly
    this run, stage, round and kind."""
    if not isinstance(signature, bytes) or not signature:
        raise SignatureError("the global adaptors carry no consortium signature")
    try:
        load_public_key(public_key).verify(signature, round_digest(record, binding))
    except InvalidSignature:
        raise SignatureError("the round's signature does not verify with the consortium key for this run, stage, "
                             "round and kind: the adaptors were changed, the round replayed or re-targeted, or "
                             "signed by another key") from None


def seal_digest(state: dict[str, Any], files: dict[str, bytes]) -> bytes:
    """What a run-state seal covers: the state (without its seal) and the sha256 of each file it names."""
    body = canonical({k: v for k, v in state.items() if k != "seal"})
    parts = b"".join(name.encode() + b"\0" + hashlib.sha256(data).digest() for name, data in sorted(files.items()))
    return hashlib.sha256(_DOMAIN_SEAL + len(body).to_bytes(8, "big") + body + parts).digest()


def seal(state: dict[str, Any], files: dict[str, bytes], key: PrivateKeyLike) -> dict[str, str]:
    """The seal to store in ``state["seal"]``."""
    private = load_private_key(key)
    return {"algorithm": ALGORITHM, "key_id": key_id(private),
            "signature": base64.b64encode(private.sign(seal_digest(state, files))).decode()}


def check_seal(state: dict[str, Any], files: dict[str, bytes], key: PublicKeyLike) -> None:
    """Raise :class:`SignatureError` unless ``state["seal"]`` is ``key``'s seal of this state and these files."""
    body = state.get("seal")
    if not isinstance(body, dict):
        raise SignatureError("the run state is not sealed")
    try:
        load_public_key(key).verify(base64.b64decode(body["signature"], validate=True), seal_digest(state, files))
    except (InvalidSignature, KeyError, ValueError, TypeError):
        raise SignatureError("the run state or a file it names was changed after the ServerApp sealed it, or it "
                             "was sealed with another key") from None


def canonical(value: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces, ASCII)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise RetuneError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise RetuneError(f"cannot read {what} {path}: {exc.strerror}") from None
