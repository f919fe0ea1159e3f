"""``deploy.certs``: the chain verifies, SANs are present, keys parse the way Flower reads them, private keys are
0600, nothing is overwritten unless asked, and each hospital's private key is made at the hospital only."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import ssl
import stat
import threading

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from typer.testing import CliRunner

from deploy.certs import bundle_paths, hospital_key_paths, make_certificates, make_hospital_keys, parse_san
from deploy.cli_certs import certs
from deploy.cli_hospital import hospital_app
from shared.errors import RetuneError

SANS = ["127.0.0.1", "localhost", "::1", "superlink", "fl.hospital-net.example.org"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs") / "out", sans=SANS, days=30)


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory):
    root = tmp_path_factory.mktemp("hospitals")
    return [make_hospital_keys(root / f"h{k}", f"hospital-{k}") for k in range(2)]


def _cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.mark.parametrize("host", SANS)
def test_server_certificate_chains_to_the_ca_for_every_san(bundle, host):
    verifier = PolicyBuilder().store(Store([_cert(bundle.ca_cert)])).build_server_verifier(parse_san(host))
    chain = verifier.verify(_cert(bundle.server_cert), [])
    assert chain[-1] == _cert(bundle.ca_cert)


@pytest.mark.parametrize("host", ["10.0.0.9", "evil.example.org"])
def test_server_certificate_is_refused_for_other_names(bundle, host):
    verifier = PolicyBuilder().store(Store([_cert(bundle.ca_cert)])).build_server_verifier(parse_san(host))
    with pytest.raises(VerificationError):
        verifier.verify(_cert(bundle.server_cert), [])


def test_sans_and_extensions(bundle):
    cert = _cert(bundle.server_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink", "fl.hospital-net.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                           ipaddress.ip_address("::1")}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca = _cert(bundle.ca_cert).extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ca.ca and ca.path_length == 0
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 29 <= days <= 30


def test_key_formats_are_what_flower_reads(bundle, hospitals):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    server_key = serialization.load_pem_private_key(bundle.server_key.read_bytes(), None)
    assert server_key.public_key() == _cert(bundle.server_cert).public_key()
    ca_key = serialization.load_pem_private_key(bundle.ca_key.read_bytes(), None)
    assert ca_key.public_key() == _cert(bundle.ca_cert).public_key()
    for hospital in hospitals:
        args = argparse.Namespace(auth_supernode_private_key=str(hospital.private_key), auth_supernode_public_key=None)
        private, public = _try_setup_client_authentication(args)  # what flower-supernode does with the key
        assert isinstance(private.curve, ec.SECP384R1)
        assert try_load_public_key(hospital.public_key) == public_key_to_bytes(public)  # flwr supernode register
        assert hospital.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    keys = {h.public_key.read_bytes() for h in hospitals}
    assert len(keys) == len(hospitals)


def test_superexec_secrets_are_distinct_raw_hex(bundle, hospitals):
    from flwr.supercore.auth import load_superexec_auth_secret

    found = [load_superexec_auth_secret(str(p)) for p in
             (bundle.superexec_secret, *(h.superexec_secret for h in hospitals))]
    assert all(len(s) == 64 and bytes.fromhex(s.decode()) for s in found)  # no trailing newline
    assert len(set(found)) == len(found)


def test_private_keys_are_0600_and_public_files_not_writable_by_others(bundle, hospitals):
    for path in [*bundle.private_files(), *(p for h in hospitals for p in (h.private_key, h.superexec_secret))]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in [*(set(bundle.files()) - set(bundle.private_files())), *(h.public_key for h in hospitals)]:
        assert not path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH), path


def test_the_operator_bundle_holds_no_hospital_key(bundle):
    """The operator's tool makes the server side only: it never writes, so never sees, a hospital private key."""
    written = sorted(p.relative_to(bundle.out).as_posix() for p in bundle.out.rglob("*") if p.is_file())
    assert written == ["ca.crt", "ca.key", "server.key", "server.pem", "superexec.secret"]
    for path in bundle.out.rglob("*"):
        assert b"OPENSSH PRIVATE KEY" not in path.read_bytes()


def test_private_keys_are_0600_whatever_the_umask(tmp_path):
    import os

    old = os.umask(0)
    try:
        written = make_certificates(tmp_path / "c")
        keys = make_hospital_keys(tmp_path / "h", "hospital-0")
    finally:
        os.umask(old)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in written.private_files())
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (keys.private_key, keys.superexec_secret))


def test_existing_files_are_never_overwritten_without_force(tmp_path):
    first = make_certificates(tmp_path / "c")
    before = {p: p.read_bytes() for p in first.files()}
    with pytest.raises(RetuneError, match="refusing to overwrite.*--force"):
        make_certificates(tmp_path / "c")
    assert {p: p.read_bytes() for p in first.files()} == before
    keys = make_hospital_keys(tmp_path / "h", "hospital-0")
    kept = keys.private_key.read_bytes()
    with pytest.raises(RetuneError, match="register the new auth.pub"):
        make_hospital_keys(tmp_path / "h", "hospital-0")
    assert keys.private_key.read_bytes() == kept
    assert make_hospital_keys(tmp_path / "h", "hospital-0", force=True).private_key.read_bytes() != kept
    again = make_certificates(tmp_path / "c", force=True)
    assert all(again_bytes != before[p] for p, again_bytes in ((p, p.read_bytes()) for p in again.files()))
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in again.private_files())


def test_a_single_existing_key_blocks_everything(tmp_path):
    key = bundle_paths(tmp_path / "c").server_key
    key.parent.mkdir(parents=True)
    key.write_text("precious")
    with pytest.raises(RetuneError):
        make_certificates(tmp_path / "c")
    assert key.read_text() == "precious" and not (tmp_path / "c" / "ca.key").exists()
    secret = hospital_key_paths(tmp_path / "h").superexec_secret
    secret.parent.mkdir(parents=True)
    secret.write_text("precious")
    with pytest.raises(RetuneError):
        make_hospital_keys(tmp_path / "h", "hospital-0")
    assert secret.read_text() == "precious" and not (tmp_path / "h" / "auth.key").exists()


@pytest.mark.parametrize("san", ["", "https://superlink", "superlink:8000", "bad_name", "a..b", "-x.org",
                                 "999.1.1.1", "host/path", "x" * 64 + ".org"])
def test_bad_sans_are_clear_errors(tmp_path, san):
    with pytest.raises(RetuneError, match="--san"):
        make_certificates(tmp_path / "c", sans=["localhost", san])
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("san,kind", [("::1", x509.IPAddress), ("[::1]", x509.IPAddress), ("10.1.2.3", x509.IPAddress),
                                      ("*.example.org", x509.DNSName), ("SuperLink.local.", x509.DNSName)])
def test_good_sans(san, kind):
    assert isinstance(parse_san(san), kind)


def test_a_long_dns_name_is_fine(tmp_path):
    long_name = ".".join(["a" * 60] * 3) + ".org"
    written = make_certificates(tmp_path / "c", sans=[long_name])
    verifier = PolicyBuilder().store(Store([_cert(written.ca_cert)])).build_server_verifier(x509.DNSName(long_name))
    verifier.verify(_cert(written.server_cert), [])


def test_bad_validity(tmp_path):
    with pytest.raises(RetuneError, match="--days"):
        make_certificates(tmp_path / "c", days=0)


def test_a_real_tls_handshake_with_python_ssl(bundle):
    """What a SuperNode's HTTPS client does: trust ca.crt only and check the host name."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(bundle.server_cert, bundle.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(bundle.ca_cert))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.recv(2) == b"ok"
    finally:
        thread.join(timeout=10)
        listener.close()


def test_command_writes_and_explains_where_files_go(tmp_path):
    app = typer.Typer()
    app.command()(certs)
    runner = CliRunner()
    out = tmp_path / "certs"
    result = runner.invoke(app, ["--out", str(out), "--san", "10.0.0.5", "--san", "superlink"])
    assert result.exit_code == 0, result.output
    for text in ("ca.key: operator only", "server.pem, server.key", "10.0.0.5, superlink", "retune hospital keys",
                 "flwr supernode register auth.pub"):
        assert text in result.output
    again = runner.invoke(app, ["--out", str(out)])
    assert isinstance(again.exception, RetuneError)
    bad = runner.invoke(app, ["--out", str(tmp_path / "other"), "--san", "https://x"])
    assert isinstance(bad.exception, RetuneError)


def test_hospital_keys_command_makes_the_pair_at_the_hospital(tmp_path):
    runner = CliRunner()
    result = runner.invoke(hospital_app, ["keys", "--out", str(tmp_path / "keys"), "--name", "st-mary"])
    assert result.exit_code == 0, result.output
    keys = hospital_key_paths(tmp_path / "keys")
    assert keys.public_key.read_text().rstrip().endswith("retune-st-mary")
    assert "send" in result.output and "auth.pub" in result.output
    again = runner.invoke(hospital_app, ["keys", "--out", str(tmp_path / "keys")])
    assert isinstance(again.exception, RetuneError)
