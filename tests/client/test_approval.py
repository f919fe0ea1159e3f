"""Code approval: the code hash, the approved list, and a mod that refuses unapproved code before the app runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client.approval import (CodeManifest, add_approval, approval_mod, code_manifest, diff_manifest,
                             find_approval, read_approved, running_code)
from client.audit import REFUSED, AuditLog
from shared.errors import RetuneError
from shared.wire import METRICS, NUM_EXAMPLES

ROOT = Path(__file__).resolve().parents[2]


def _message() -> Message:
    meta = Metadata(run_id=3, message_id="m-1", src_node_id=1, dst_node_id=9, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=600.0, message_type="evaluate")
    return Message(metadata=meta, content=RecordDict({"config": ConfigRecord({"stage": 0, "round": 0})}))


def _context(**node_config: str) -> Context:
    return Context(run_id=3, node_id=9, node_config=dict(node_config), state=RecordDict(), run_config={})


def _app(mods, marker: Path) -> ClientApp:
    """A ClientApp whose handler stands for 'touching hospital data': it writes a marker file."""
    app = ClientApp(mods=mods)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        marker.write_text("hospital data were read")
        return Message(RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 1})}), reply_to=msg)

    return app


def test_code_hash_covers_sources_and_assets_and_is_reproducible_with_sha256sum():
    manifest = running_code()
    paths = {f.path for f in manifest.files}
    assert {"client/app.py", "client/approval.py", "shared/wire.py"} <= paths
    assert any(p.startswith("shared/assets/") and p.endswith(".json") for p in paths)
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in paths)
    assert code_manifest(ROOT).code_hash == manifest.code_hash  # the packages this test imports
    cmd = ("find client shared -type f \\( -name '*.py' -o -name '*.json' -o -path '*/assets/*' \\) "
           "-not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum | sha256sum")
    out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == manifest.code_hash


def test_any_change_to_the_code_changes_the_hash_and_shows_in_the_diff(tmp_path):
    for name in ("client", "shared"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_manifest(tmp_path)
    with (tmp_path / "client" / "app.py").open("a") as f:
        f.write("\n# exfiltrate()\n")
    (tmp_path / "client" / "extra.py").write_text("print('new')\n")
    (tmp_path / "shared" / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "shared" / "__pycache__" / "x.pyc").write_bytes(b"ignored")
    after = code_manifest(tmp_path)
    assert after.code_hash != before.code_hash
    diff = diff_manifest(before.as_dict(), after)
    assert diff.changed == ("client/app.py",) and diff.added == ("client/extra.py",) and diff.removed == ()
    with pytest.raises(RetuneError, match="client/ and shared/"):
        code_manifest(tmp_path / "client")


def test_approved_list_round_trip(tmp_path):
    path = tmp_path / "it" / "approved.json"
    assert read_approved(path) == []
    entry = add_approval(path, running_code(), "dr-it", "ticket 42")
    data = json.loads(path.read_text())
    assert data["approved"] == [entry] and entry["approved_by"] == "dr-it" and entry["note"] == "ticket 42"
    assert find_approval(path, running_code().code_hash) == entry and find_approval(path, "0" * 64) is None
    path.write_text("{not json")
    with pytest.raises(RetuneError, match="not valid"):
        read_approved(path)


def test_unapproved_code_is_refused_before_the_app_touches_data(tmp_path):
    approved, audit, marker = tmp_path / "approved.json", tmp_path / "audit.jsonl", tmp_path / "marker"
    add_approval(approved, CodeManifest(files=()), "it", "an older version")  # someone else's
    app = _app([approval_mod(approved, audit_path=audit)], marker)
    reply = app(_message(), _context())
    assert reply.has_error() and reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert "not approved" in reply.error.reason and str(tmp_path) not in reply.error.reason
    assert not marker.exists()
    (entry,) = AuditLog(audit).entries()
    assert entry["event"] == REFUSED and entry["code_hash"] == running_code().code_hash

    add_approval(approved, running_code(), "it", "reviewed")
    reply = app(_message(), _context())
    assert reply.has_content() and marker.exists()


def test_list_from_node_config_missing_or_broken_list_refuses(tmp_path):
    marker = tmp_path / "marker"
    app = _app([approval_mod()], marker)
    for path in (tmp_path / "missing.json", tmp_path / "broken.json"):
        if path.name == "broken.json":
            path.write_text("[1, 2]")
        reply = app(_message(), _context(**{"approved-apps": str(path)}))
        assert reply.has_error() and not marker.exists()
    assert app(_message(), _context()).has_content()  # no approved-apps configured: approval not in force
