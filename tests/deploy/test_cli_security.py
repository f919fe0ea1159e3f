"""``retune audit verify``, ``retune approve`` and ``retune keys`` through typer's CliRunner."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import typer
from typer.testing import CliRunner

from client.approval import code_manifest, read_approved
from client.audit import SENT, AuditLog
from deploy.cli_approve import approve
from deploy.cli_audit import audit_app
from deploy.cli_keys import keys
from shared.errors import RetuneError
from shared.signing import PRIVATE_KEY, PUBLIC_KEY, key_id

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _app() -> typer.Typer:
    """The commands registered the way ``deploy.cli`` registers them."""
    app = typer.Typer()
    app.add_typer(audit_app, name="audit")
    app.command()(approve)
    app.command()(keys)
    return app


def test_audit_verify_ok_and_tampered(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    head = [log.append({"event": SENT, "bytes": i}) for i in range(3)][-1]["hash"]
    result = runner.invoke(_app(), ["audit", "verify", str(log.path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"OK {log.path}: 3 entries, chain intact, head {head}"
    lines = log.path.read_text().splitlines()
    lines[1] = lines[1].replace('"bytes":1', '"bytes":9')
    log.path.write_text("\n".join(lines) + "\n")
    result = runner.invoke(_app(), ["audit", "verify", str(log.path)])
    assert result.exit_code == 1 and "line 2" in result.output and "changed" in result.output
    missing = runner.invoke(_app(), ["audit", "verify", str(tmp_path / "nope.jsonl")])
    assert isinstance(missing.exception, RetuneError)  # `retune` prints it as one line and exits 2


def test_audit_verify_head_detects_a_cut_off_end(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    head = [log.append({"event": SENT, "i": i}) for i in range(3)][-1]["hash"]
    log.path.write_text("".join(log.path.read_text().splitlines(keepends=True)[:2]))
    result = runner.invoke(_app(), ["audit", "verify", str(log.path), "--head", head])
    assert result.exit_code == 1 and "cut off" in result.output


def test_approve_show_then_approve_then_already_approved(tmp_path):
    listing = tmp_path / "approved.json"
    shown = runner.invoke(_app(), ["approve", "--list", str(listing), "--show"])
    code_hash = code_manifest(ROOT).code_hash
    assert shown.exit_code == 0, shown.output
    assert f"code hash: {code_hash}" in shown.stdout and "client/approval.py" in shown.stdout
    assert "not approved yet" in shown.stdout and not listing.exists()

    declined = runner.invoke(_app(), ["approve", "--list", str(listing)], input="n\n")
    assert declined.exit_code == 1 and not listing.exists()

    done = runner.invoke(_app(), ["approve", "--list", str(listing), "--yes", "--by", "it-admin",
                                  "--note", "reviewed in ticket 7"])
    assert done.exit_code == 0, done.output
    (entry,) = read_approved(listing)
    assert (entry["code_hash"], entry["approved_by"], entry["note"]) == (code_hash, "it-admin", "reviewed in ticket 7")
    assert entry["files"]["client/app.py"]["size"] == (ROOT / "client" / "app.py").stat().st_size

    again = runner.invoke(_app(), ["approve", "--list", str(listing), "--yes"])
    assert again.exit_code == 0 and "already approved by it-admin" in again.stdout
    assert len(read_approved(listing)) == 1


def test_approve_shows_the_diff_against_the_last_approval(tmp_path):
    listing = tmp_path / "approved.json"
    assert runner.invoke(_app(), ["approve", "--list", str(listing), "--yes", "--by", "it"]).exit_code == 0
    source = tmp_path / "fab"
    for name in ("client", "shared"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    (source / "client" / "site.py").write_text("# rewritten\n")
    result = runner.invoke(_app(), ["approve", "--list", str(listing), "--source", str(source), "--yes",
                                    "--by", "it", "--note", "v2"])
    assert result.exit_code == 0, result.output
    assert "1 changed, 0 added, 0 removed" in result.stdout and "~ client/site.py" in result.stdout
    assert [e["note"] for e in json.loads(listing.read_text())["approved"]] == ["", "v2"]


def test_keys_writes_a_private_key_only_the_owner_reads(tmp_path):
    result = runner.invoke(_app(), ["keys", "--out", str(tmp_path / "consortium")])
    assert result.exit_code == 0, result.output
    private, public = tmp_path / "consortium" / PRIVATE_KEY, tmp_path / "consortium" / PUBLIC_KEY
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and public.is_file()
    assert key_id(public) in result.stdout
    before = public.read_bytes()
    again = runner.invoke(_app(), ["keys", "--out", str(tmp_path / "consortium")])
    assert isinstance(again.exception, RetuneError) and public.read_bytes() == before
    forced = runner.invoke(_app(), ["keys", "--out", str(tmp_path / "consortium"), "--force"])
    assert forced.exit_code == 0 and public.read_bytes() != before
