"""``retune audit verify``, ``retune approve`` and ``retune keys`` through typer's CliRunner."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from client.approval import code_manifest
from shared.app_packages import AppPackage, read_approved, store_pending
from client.audit import SENT, AuditLog
from deploy.cli_approve import approve
from deploy.cli_audit import audit_app
from deploy.cli_keys import keys
from shared.errors import RetuneError
from shared.signing import PRIVATE_KEY, PUBLIC_KEY, key_id
from tests.conftest import fab_of, make_app

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


def test_audit_show_can_show_the_values_each_reply_carried(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append({"event": SENT, "message_type": "evaluate", "records": ["metrics", "site"], "bytes": 40,
                "metric_values": {"auroc/all/Edema": 0.81234, "pos/all/Edema": 15}, "reason": "[bold]x[/bold]"})
    shown = runner.invoke(_app(), ["audit", "show", str(log.path), "--metrics"], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    assert "auroc/all/Edema=0.8123" in shown.stdout and "pos/all/Edema=15" in shown.stdout
    assert "[bold]x[/bold]" in shown.stdout  # text from a reply is shown as written, never as markup


@pytest.fixture(scope="module")
def fabs(tmp_path_factory) -> dict[str, Path]:
    """The app package built from this checkout, and one whose client/site.py and pyproject changed."""
    root = tmp_path_factory.mktemp("fabs")

    def tamper(app: Path) -> None:
        (app / "client" / "site.py").write_text("# rewritten\n")

    paths = {}
    for name, edit in (("v1", None), ("v2", tamper)):
        paths[name] = root / f"{name}.fab"
        paths[name].write_bytes(fab_of(make_app(root / name / "retune-fl", edit)))
    return paths


def test_approve_show_then_approve_then_already_approved(tmp_path, fabs):
    listing = tmp_path / "approved.json"
    package = AppPackage.from_file(fabs["v1"])
    shown = runner.invoke(_app(), ["approve", "--list", str(listing), "--fab", str(fabs["v1"]), "--show"])
    assert shown.exit_code == 0, shown.output
    assert f"package hash: {package.fab_hash}" in shown.stdout and "client/approval.py" in shown.stdout
    assert "equal the installed hospital runtime" in shown.stdout
    assert "not approved yet" in shown.stdout and not listing.exists()

    declined = runner.invoke(_app(), ["approve", "--list", str(listing), "--fab", str(fabs["v1"])], input="n\n")
    assert declined.exit_code == 1 and not listing.exists()

    done = runner.invoke(_app(), ["approve", "--list", str(listing), "--fab", str(fabs["v1"]), "--yes",
                                  "--by", "it-admin", "--note", "reviewed in ticket 7"])
    assert done.exit_code == 0, done.output
    (entry,) = read_approved(listing)
    assert (entry["fab_hash"], entry["approved_by"], entry["note"]) == (package.fab_hash, "it-admin",
                                                                        "reviewed in ticket 7")
    assert entry["files"]["client/app.py"]["size"] == (ROOT / "client" / "app.py").stat().st_size

    again = runner.invoke(_app(), ["approve", "--list", str(listing), "--fab", str(fabs["v1"]), "--yes"])
    assert again.exit_code == 0 and "already approved by it-admin" in again.stdout
    assert len(read_approved(listing)) == 1


def test_approve_shows_the_diff_and_that_package_hospital_code_never_runs(tmp_path, fabs):
    listing = tmp_path / "approved.json"
    assert runner.invoke(_app(), ["approve", "--list", str(listing), "--fab", str(fabs["v1"]), "--yes",
                                  "--by", "it"]).exit_code == 0
    result = runner.invoke(_app(), ["approve", "--list", str(listing), "--fab", str(fabs["v2"]), "--yes",
                                    "--by", "it", "--note", "v2"])
    assert result.exit_code == 0, result.output
    assert "1 changed, 0 added, 0 removed" in result.stdout and "~ client/site.py" in result.stdout
    assert "differ from the installed hospital runtime" in result.stdout and "never run here" in result.stdout
    assert [e["note"] for e in json.loads(listing.read_text())["approved"]] == ["", "v2"]


def _with_entry(fab: Path, name: str, data: bytes, out: Path) -> Path:
    """``fab`` with one more file ``name`` (a package anyone can zip by hand)."""
    import zipfile

    with zipfile.ZipFile(fab) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info))
        target.writestr(name, data)
    return out


def test_approve_shows_what_the_package_holds_as_text_never_as_markup(tmp_path, fabs):
    """A file named with terminal markup must show as it is named: rendered as markup, ``[conceal]...[/conceal]``
    hid the name of the file it wraps from IT's review."""
    hidden = "[conceal]server/exfiltrate.py[/conceal]"
    fab = _with_entry(fabs["v1"], hidden, b"import os\n", tmp_path / "sneaky.fab")
    shown = runner.invoke(_app(), ["approve", "--list", str(tmp_path / "approved.json"), "--fab", str(fab), "--show"],
                          env={"COLUMNS": "400"})
    assert shown.exit_code == 0, shown.output
    assert hidden in shown.stdout


def test_approve_shows_the_default_run_config_against_the_hospitals_floor(tmp_path, fabs):
    shown = runner.invoke(_app(), ["approve", "--list", str(tmp_path / "approved.json"), "--fab", str(fabs["v1"]),
                                   "--show", "--node-config", 'require-secure-aggregation=true dp-max-epsilon=8'],
                          env={"COLUMNS": "400"})
    assert shown.exit_code == 0, shown.output
    rows = {line.split("│")[1].strip(): line for line in shown.stdout.splitlines() if line.count("│") >= 5}
    assert "required" in rows["secure aggregation"] and "REFUSED" in rows["secure aggregation"]
    assert "ok" in rows["adaptor kind"] and "ε ≤ 8 over all runs" in rows["DP-SGD"]
    assert "a run may override the defaults" in shown.stdout


def test_approve_lists_refused_packages_and_shows_the_installed_runtime(tmp_path, fabs):
    listing = tmp_path / "approved.json"
    stored = store_pending(listing, fabs["v2"].read_bytes(), AppPackage.from_file(fabs["v2"]).fab_hash)
    waiting = runner.invoke(_app(), ["approve", "--list", str(listing), "--pending"])
    assert waiting.exit_code == 0 and str(stored) in waiting.stdout
    installed = runner.invoke(_app(), ["approve", "--list", str(listing), "--installed"])
    assert installed.exit_code == 0 and f"runtime code hash: {code_manifest(ROOT).code_hash}" in installed.stdout
    nothing = runner.invoke(_app(), ["approve", "--list", str(listing)])
    assert isinstance(nothing.exception, RetuneError)


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
