"""Who the hospitals of a secure aggregation are: the consortium's roster, and key announcements signed under it.

In secure aggregation the server relays every hospital's public keys to the others. If hospitals took those keys on
the server's word, the server could replace a peer's keys by its own and decrypt the shares meant for that peer,
or invent peers (sybils) until it holds a threshold of shares. So every hospital signs its key announcement with a
long-term identity key (its SuperNode authentication key, or any ECDSA P-384 / Ed25519 key in OpenSSH format), and
checks every peer's announcement against the **roster**: a file the consortium hands every hospital, naming each
member hospital and its public identity key (``retune roster``), which hospital IT can compare with the keys it
knows. An announcement binds the protocol, Flower's run id, the round's session, the hospital's index and name and
both of its public keys, so it cannot be replayed into another round or attributed to another hospital. The same
identity key signs the round's survivor set in the consistency check (:func:`survivors_view`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import RetuneError

ROSTER_FORMAT = "retune-roster/1"
_DOMAIN = b"retune-fl/secagg-announcement/v1\n"
_DOMAIN_VIEW = b"retune-fl/secagg-survivors/v2\n"
_DOMAIN_TRANSCRIPT = b"retune-fl/secagg-transcript/v1\n"
#: The largest signature an announcement may carry (a DER ECDSA P-384 signature is at most 104 bytes).
MAX_SIGNATURE_BYTES = 160

PrivateIdentity = ec.EllipticCurvePrivateKey | Ed25519PrivateKey
PublicIdentity = ec.EllipticCurvePublicKey | Ed25519PublicKey


class IdentityError(RetuneError):
    """A roster or identity key that cannot be used, or an announcement that does not verify."""


def _public(text: str, where: str) -> PublicIdentity:
    try:
        key = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{where}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, (ec.EllipticCurvePublicKey, Ed25519PublicKey)):
        raise IdentityError(f"{where}: an identity key must be ECDSA or Ed25519")
    return key


def fingerprint(key: PublicIdentity) -> str:
    """sha256 of the key's OpenSSH encoding, as ``ssh-keygen -lf`` would show it (hex)."""
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class Roster:
    """The consortium's member hospitals: name -> public identity key."""

    keys: dict[str, PublicIdentity]

    @classmethod
    def read(cls, path: Path | str) -> Roster:
        try:
            data = json.loads(Path(path).read_text())
            entries = data["hospitals"] if data.get("format") == ROSTER_FORMAT else None
            if not isinstance(entries, dict) or not entries:
                raise ValueError(f"expected {{'format': {ROSTER_FORMAT!r}, 'hospitals': {{name: public key}}}}")
        except (OSError, ValueError, AttributeError) as exc:
            raise IdentityError(f"roster {path} cannot be used: {exc}") from None
        return cls({name: _public(text, f"roster {path}, {name}") for name, text in entries.items()})

    @staticmethod
    def write(path: Path | str, public_keys: dict[str, Path | str]) -> Path:
        """Write a roster from each member's public key file (OpenSSH), checking every key parses."""
        entries = {}
        for name, key_file in sorted(public_keys.items()):
            text = Path(key_file).read_text().strip()
            _public(text, str(key_file))
            entries[name] = text
        if not entries:
            raise IdentityError("a roster needs at least one hospital")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": ROSTER_FORMAT, "hospitals": entries}, indent=2) + "\n")
        return path


def load_identity(path: Path | str) -> PrivateIdentity:
    """A hospital's private identity key (OpenSSH, unencrypted)."""
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise IdentityError(f"identity key {path} cannot be read: {exc}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, Ed25519PrivateKey)):
        raise IdentityError(f"identity key {path} must be ECDSA or Ed25519")
    return key


def announcement(protocol: str, run_id: int, session: bytes, index: int, name: str, pk1: bytes, pk2: bytes) -> bytes:
    """The bytes a hospital signs when it announces its round keys."""
    head = json.dumps([protocol, run_id, session.hex(), index, name]).encode()
    return _DOMAIN + len(head).to_bytes(8, "big") + head + pk1 + pk2


def session_transcript(protocol: str, run_id: int, session: bytes, position: list[int], indices: list[int],
                       names: list[str], pk1s: list[bytes], pk2s: list[bytes], threshold: int) -> bytes:
    """sha256 of everything a hospital accepted at key sharing: the run, session and round, and every member's
    index, name and fresh public keys. A hospital's keys are new at every setup, so no two setups share a
    transcript, even under one session id."""
    body = json.dumps([protocol, run_id, session.hex(), position, indices, names, [k.hex() for k in pk1s],
                       [k.hex() for k in pk2s], threshold]).encode()
    return hashlib.sha256(_DOMAIN_TRANSCRIPT + body).digest()


def survivors_view(transcript: bytes, survivors: list[int], dropped: list[int]) -> bytes:
    """The bytes a hospital signs in a round's consistency check: which hospitals' masked vectors are in the sum
    (``survivors``) and which shared keys but are not (``dropped``), by index, for the key sharing of
    ``transcript`` (:func:`session_transcript`)."""
    head = json.dumps([transcript.hex(), sorted(survivors), sorted(dropped)]).encode()
    return _DOMAIN_VIEW + len(head).to_bytes(8, "big") + head


def sign(key: PrivateIdentity, message: bytes) -> bytes:
    if isinstance(key, Ed25519PrivateKey):
        return key.sign(message)
    return key.sign(message, ec.ECDSA(hashes.SHA384()))


def verify(key: PublicIdentity, signature: bytes, message: bytes) -> bool:
    try:
        if isinstance(key, Ed25519PublicKey):
            key.verify(signature, message)
        else:
            key.verify(signature, message, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False
    return True
