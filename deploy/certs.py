"""Certificates and keys for a TLS federation with SuperNode authentication (``retune certs``).

One folder holds everything an operator hands out::

    ca.crt, ca.key                     the federation's certificate authority (ca.key stays with the operator)
    server.pem, server.key             the SuperLink's TLS certificate (signed by the CA) and key
    superexec.secret                   shared by the SuperLink and its ServerApp SuperExec (process isolation)
    hospital-K/auth.key, auth.pub      hospital K's SuperNode authentication key pair (OpenSSH encoding)
    hospital-K/superexec.secret        shared by hospital K's SuperNode and its ClientApp SuperExec

Formats follow what Flower 1.41 reads: PEM certificates and keys for TLS (``--ssl-*``,
``--root-certificates``); ECDSA SECP384R1 node keys as an OpenSSH private key
(``flower-supernode --auth-supernode-private-key``) and an OpenSSH public key
(``flwr supernode register KEY.pub``); SuperExec secrets are raw bytes (``--superexec-auth-secret-file``, an
HMAC key that keeps others off a Runtime API). Private files are written with mode 0600 and never overwritten
unless asked (``force``).
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
#: flower-superlink's default port (Fleet, Control and Runtime APIs over HTTPS in Flower 1.41).
SUPERLINK_PORT = 8000
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class HospitalKeys:
    """One hospital's SuperNode authentication key pair."""

    index: int
    private_key: Path
    public_key: Path
    superexec_secret: Path


@dataclass(frozen=True)
class CertBundle:
    """Paths of everything :func:`make_certificates` wrote."""

    out: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    superexec_secret: Path
    hospitals: tuple[HospitalKeys, ...]
    sans: tuple[str, ...]

    def private_files(self) -> list[Path]:
        return [self.ca_key, self.server_key, self.superexec_secret,
                *(p for h in self.hospitals for p in (h.private_key, h.superexec_secret))]

    def files(self) -> list[Path]:
        return [self.ca_cert, self.server_cert, *self.private_files(), *(h.public_key for h in self.hospitals)]


def hospital_dir(out: Path, index: int) -> Path:
    """Folder of hospital ``index``'s key pair (``hospital-K``, K from 0 as in simulations)."""
    return out / f"hospital-{index}"


def bundle_paths(out: Path, hospitals: int, sans: Sequence[str] = DEFAULT_SANS) -> CertBundle:
    """Where :func:`make_certificates` writes (nothing is read or written)."""
    keys = tuple(HospitalKeys(k, hospital_dir(out, k) / NODE_KEY, hospital_dir(out, k) / NODE_PUB,
                              hospital_dir(out, k) / SUPEREXEC_SECRET) for k in range(hospitals))
    return CertBundle(out, out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY, out / SUPEREXEC_SECRET,
                      keys, tuple(sans))


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


def _check_args(out: Path, hospitals: int, days: int, sans: Sequence[str], force: bool) -> CertBundle:
    if hospitals < 1:
        raise RetuneError(f"--hospitals must be at least 1 (got {hospitals})")
    if days < 1:
        raise RetuneError(f"--days must be at least 1 (got {days})")
    if out.exists() and not out.is_dir():
        raise RetuneError(f"{out} exists and is not a folder: choose another --out")
    for san in sans:
        parse_san(san)
    bundle = bundle_paths(out, hospitals, sans)
    existing = [p for p in bundle.files() if p.exists()]
    if existing and not force:
        shown = ", ".join(str(p) for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
        raise RetuneError(f"{len(existing)} certificate/key files already exist ({shown}); refusing to overwrite "
                          "them: choose another --out, or pass --force to replace them all (hospitals must then "
                          "be registered again and every party gets the new ca.crt)")
    return bundle


def make_certificates(out: Path | str, hospitals: int, sans: Sequence[str] = DEFAULT_SANS, days: int = 365,
                      force: bool = False) -> CertBundle:
    """Write a CA, the SuperLink certificate for ``sans`` and ``hospitals`` node key pairs under ``out``.

    Raises :class:`RetuneError` for a bad SAN or count, or when any target file exists and ``force`` is off
    (then nothing is written).
    """
    bundle = _check_args(Path(out), hospitals, days, list(sans), force)
    ca_key, ca_cert = make_ca(days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, list(sans), days)
    bundle.out.mkdir(parents=True, exist_ok=True)
    _write(bundle.ca_key, _pem_key(ca_key), private=True)
    _write(bundle.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(bundle.server_key, _pem_key(server_key), private=True)
    _write(bundle.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(bundle.superexec_secret, make_superexec_secret(), private=True)
    for hospital in bundle.hospitals:
        private, public = make_node_keys(f"retune-hospital-{hospital.index}")
        _write(hospital.private_key, private, private=True)
        _write(hospital.public_key, public, private=False)
        _write(hospital.superexec_secret, make_superexec_secret(), private=True)
    return bundle


def summary(bundle: CertBundle, address: str | None = None) -> str:
    """Which file goes where, as plain text for the operator."""
    first = bundle.sans[0] if bundle.sans else "SUPERLINK"
    host = address or (f"[{first}]" if ":" in first else first) + f":{SUPERLINK_PORT}"
    secret = bundle.superexec_secret.name
    lines = [
        f"Wrote certificates and keys to {bundle.out} (SuperLink names: {', '.join(bundle.sans)}).",
        "",
        f"Operator only, kept offline: {bundle.ca_key.name} (signs certificates; never copy it to a server).",
        "",
        f"SuperLink (aggregation server): {bundle.ca_cert.name}, {bundle.server_cert.name}, "
        f"{bundle.server_key.name}, {secret}",
        f"  flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key "
        f"--enable-supernode-auth --isolation process --superexec-auth-secret-file {secret}",
        f"  flower-superexec --runtime-api-address {host} --root-certificates ca.crt "
        f"--superexec-auth-secret-file {secret}",
        "",
    ]
    for h in bundle.hospitals:
        rel = h.private_key.parent.name
        lines += [
            f"Hospital {h.index}: {bundle.ca_cert.name}, {rel}/{h.private_key.name}, {rel}/{h.superexec_secret.name}",
            f"  operator first registers its public key: flwr supernode register {rel}/{h.public_key.name} "
            "<connection>",
            f"  flower-supernode --superlink {host} --root-certificates ca.crt --auth-supernode-private-key "
            f"{h.private_key.name} --isolation process --superexec-auth-secret-file {secret} --node-config '...'",
            f"  flower-superexec --runtime-api-address <supernode>:9094 --insecure --superexec-auth-secret-file "
            f"{secret}",
        ]
    lines += ["", "The operator's flwr CLI connection ($FLWR_HOME/config.toml) sets root-certificates to the "
              "absolute path of ca.crt.",
              "Private files (0600) go to their one destination only; public keys and ca.crt are not secret."]
    return "\n".join(lines)
