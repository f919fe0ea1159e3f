"""Certificates and keys of a TLS federation with SuperNode authentication, each made where it is used.

The operator (``retune certs``) makes the server side, one folder::

    ca.crt, ca.key          the federation's certificate authority (ca.key stays with the operator, offline)
    server.pem, server.key  the SuperLink's (and gateway's) TLS certificate, signed by the CA, and its key
    superexec.secret        shared by the SuperLink and its ServerApp SuperExec (process isolation)

Each hospital (``retune hospital keys``) makes its own, and hands the operator only the public key::

    auth.key, auth.pub      its SuperNode authentication key pair (OpenSSH encoding)
    superexec.secret        shared by its SuperNode and its runtime (``retune hospital serve``)

so no operator tool ever sees a hospital's private key, and the operator cannot act as a hospital.

Formats follow what Flower 1.41 reads: PEM certificates and keys for TLS (``--ssl-*``, ``--root-certificates``);
ECDSA SECP384R1 node keys as an OpenSSH private key (``flower-supernode --auth-supernode-private-key``) and an
OpenSSH public key (``flwr supernode register KEY.pub``); SuperExec secrets are raw bytes
(``--superexec-auth-secret-file``, an HMAC key that keeps others off a Runtime API). Private files are written with
mode 0600 and never overwritten unless asked (``force``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import RetuneError

#: SANs of the SuperLink certificate unless told otherwise: a SuperLink reached on this machine.
DEFAULT_SANS = ("127.0.0.1", "localhost")
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
NODE_KEY, NODE_PUB = "auth.key", "auth.pub"
SUPEREXEC_SECRET = "superexec.secret"
PRIVATE_MODE = 0o600
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class CertBundle:
    """Paths of everything :func:`make_certificates` wrote (the server side)."""

    out: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    superexec_secret: Path
    sans: tuple[str, ...]

    def private_files(self) -> list[Path]:
        return [self.ca_key, self.server_key, self.superexec_secret]

    def files(self) -> list[Path]:
        return [self.ca_cert, self.server_cert, *self.private_files()]


@dataclass(frozen=True)
class HospitalKeys:
    """Paths of what :func:`make_hospital_keys` wrote: a hospital's own key pair and runtime secret."""

    private_key: Path
    public_key: Path
    superexec_secret: Path

    def files(self) -> list[Path]:
        return [self.private_key, self.public_key, self.superexec_secret]


def bundle_paths(out: Path, sans: Sequence[str] = DEFAULT_SANS) -> CertBundle:
    """Where :func:`make_certificates` writes (nothing is read or written)."""
    return CertBundle(out, out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY, out / SUPEREXEC_SECRET,
                      tuple(sans))


def hospital_key_paths(out: Path) -> HospitalKeys:
    """Where :func:`make_hospital_keys` writes (nothing is read or written)."""
    return HospitalKeys(out / NODE_KEY, out / NODE_PUB, out / SUPEREXEC_SECRET)


def parse_san(value: str) -> x509.GeneralName:
    """An IP address (v4 or v6) or a DNS name (``*.`` wildcard allowed) as a subject alternative name."""
    text = value.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    hint = ("give a bare host name or IP address the SuperNodes and the flwr CLI connect to, "
            "e.g. --san 10.0.0.5 --san superlink.hospital-net.org")
    if not text:
        raise RetuneError(f"empty --san: {hint}")
    if "://" in text or "/" in text or ":" in text:
        raise RetuneError(f"--san {value!r} is not a host name or IP address (no scheme, port or path): {hint}")
    name = text.rstrip(".")
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
    if len(name) > 253 or not labels or not all(_DNS_LABEL.match(label) for label in labels):
        raise RetuneError(f"--san {value!r} is not a valid DNS name (letters, digits and '-' per label, "
                          f"labels separated by '.'): {hint}")
    if labels[-1].isdigit():
        raise RetuneError(f"--san {value!r} looks like an IP address but is not a valid one: {hint}")
    return x509.DNSName(name.lower())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "retune-fl federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (ECDSA P-384) that may sign end-entity certificates only."""
    key = ec.generate_private_key(ec.SECP384R1())
    start, end = _validity(days)
    name = _name("retune-fl federation CA")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: Sequence[str],
                     days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS server certificate for ``sans``, signed by the CA."""
    names = [parse_san(s) for s in sans]
    if not names:
        raise RetuneError("the SuperLink certificate needs at least one --san (host name or IP address)")
    key = ec.generate_private_key(ec.SECP384R1())
    start, end = _validity(days)
    dns = [n.value for n in names if isinstance(n, x509.DNSName)]
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    common_name = dns[0] if dns and len(dns[0]) <= 64 else "retune-fl superlink"  # CN is at most 64 characters
    cert = (x509.CertificateBuilder().subject_name(_name(common_name))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         content_commitment=False, data_encipherment=False, key_agreement=True,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def make_node_keys(comment: str) -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair: (OpenSSH private key, OpenSSH public key line)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


def make_superexec_secret() -> bytes:
    """A SuperExec shared secret: 64 hex characters (256 bits), no newline (Flower reads the exact bytes)."""
    return secrets.token_hex(32).encode()


def _write(path: Path, data: bytes, private: bool) -> None:
    """Create ``path`` afresh; a private file is created with mode 0600 (never readable by others, not even
    briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if private:
        os.chmod(path, PRIVATE_MODE)  # whatever the umask


def _refuse_overwrite(out: Path, files: list[Path], force: bool, consequence: str) -> None:
    if out.exists() and not out.is_dir():
        raise RetuneError(f"{out} exists and is not a folder: choose another --out")
    existing = [p for p in files if p.exists()]
    if existing and not force:
        shown = ", ".join(str(p) for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
        raise RetuneError(f"{len(existing)} key files already exist ({shown}); refusing to overwrite them: choose "
                          f"another --out, or pass --force to replace them all ({consequence})")


def make_certificates(out: Path | str, sans: Sequence[str] = DEFAULT_SANS, days: int = 365,
                      force: bool = False) -> CertBundle:
    """Write a CA, the SuperLink certificate for ``sans`` and the server's SuperExec secret under ``out``.

    Raises :class:`RetuneError` for a bad SAN or validity, or when any target file exists and ``force`` is off
    (then nothing is written).
    """
    if days < 1:
        raise RetuneError(f"--days must be at least 1 (got {days})")
    for san in sans:
        parse_san(san)
    bundle = bundle_paths(Path(out), list(sans))
    _refuse_overwrite(bundle.out, bundle.files(), force, "every party then needs the new ca.crt")
    ca_key, ca_cert = make_ca(days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, list(sans), days)
    bundle.out.mkdir(parents=True, exist_ok=True)
    _write(bundle.ca_key, _pem_key(ca_key), private=True)
    _write(bundle.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(bundle.server_key, _pem_key(server_key), private=True)
    _write(bundle.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(bundle.superexec_secret, make_superexec_secret(), private=True)
    return bundle


def make_hospital_keys(out: Path | str, name: str, force: bool = False) -> HospitalKeys:
    """Write a hospital's SuperNode key pair (comment ``retune-<name>``) and its runtime's SuperExec secret under
    ``out``, at the hospital. Refuses to overwrite unless ``force``."""
    keys = hospital_key_paths(Path(out))
    _refuse_overwrite(Path(out), keys.files(), force, "the operator must then register the new auth.pub")
    private, public = make_node_keys(f"retune-{name}")
    _write(keys.private_key, private, private=True)
    _write(keys.public_key, public, private=False)
    _write(keys.superexec_secret, make_superexec_secret(), private=True)
    return keys


def summary(bundle: CertBundle) -> str:
    """Which file goes where, as plain text for the operator."""
    return "\n".join([
        f"Wrote the federation's CA and the SuperLink certificate to {bundle.out} "
        f"(names: {', '.join(bundle.sans)}).",
        f"  {bundle.ca_key.name}: operator only, kept offline (signs certificates; never copy it to a server).",
        f"  {bundle.ca_cert.name}: to the server and to every hospital (not secret).",
        f"  {bundle.server_cert.name}, {bundle.server_key.name}: the SuperLink and the gateway.",
        f"  {bundle.superexec_secret.name}: the SuperLink and its ServerApp SuperExec only.",
        "Each hospital makes its own key pair (`retune hospital keys`) and sends you its auth.pub; register it "
        "with `flwr supernode register auth.pub <connection>`.",
        "Private files are mode 0600: hand each to its one destination only.",
    ])
