"""The hospital runtime's decision on each task: refuse unapproved app packages before anything runs, serve
approved ones with the installed app (never the package's own code)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from shared.app_packages import AppPackage, add_approval, pending_path
from client.audit import REFUSED, AuditLog, verify_log
from client.runtime import NOT_APPROVED, NOT_CONFIGURED, serve_task
from tests.conftest import fab_of, make_app


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, bytes]:
    """The app as built from this checkout, and a copy whose client/ writes a marker file when imported."""
    root = tmp_path_factory.mktemp("apps")
    marker = root / "package-code-ran"

    def tamper(app: Path) -> None:
        with (app / "client" / "app.py").open("a") as f:
            f.write(f"\nopen({str(marker)!r}, 'w').write('the package ran at the hospital')\n")

    return {"plain": fab_of(make_app(root / "plain" / "retune-fl")),
            "tampered": fab_of(make_app(root / "tampered" / "retune-fl", tamper)), "marker": str(marker).encode()}


def _message() -> Message:
    meta = Metadata(run_id=3, message_id="m-1", src_node_id=1, dst_node_id=9, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=600.0, message_type="evaluate")
    return Message(metadata=meta, content=RecordDict({"config": ConfigRecord({"stage": 0, "round": 0})}))


def _context(tmp_path: Path, **extra: str) -> Context:
    node_config = {"approved-apps": str(tmp_path / "approved.json"), "audit-log": str(tmp_path / "audit.jsonl"),
                   "consortium-key": str(tmp_path / "consortium.pub"), **extra}
    return Context(run_id=3, node_id=9, node_config=node_config, state=RecordDict(), run_config={})


class InstalledApp:
    """Stands for the installed ClientApp: records that it ran (i.e. hospital data would be touched)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, msg: Message, context: Context) -> Message:
        self.calls += 1
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)


def test_an_unapproved_package_is_refused_audited_and_kept_before_the_app_runs(tmp_path, packages):
    app, fab = InstalledApp(), packages["tampered"]
    digest = hashlib.sha256(fab).hexdigest()
    add_approval(tmp_path / "approved.json", AppPackage.read(packages["plain"]), "it", "the reviewed version")
    reply, outcome = serve_task(_message(), _context(tmp_path), digest, fab, app)
    assert app.calls == 0 and not outcome.served
    assert reply.has_error() and reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert reply.error.reason == NOT_APPROVED  # fixed: no path, no hash, nothing about the hospital's set-up
    (entry,) = AuditLog(tmp_path / "audit.jsonl").entries()
    assert entry["event"] == REFUSED and entry["fab_hash"] == digest and "approved.json" in entry["reason"]
    assert verify_log(tmp_path / "audit.jsonl").ok
    assert pending_path(tmp_path / "approved.json", digest).read_bytes() == fab
    assert not Path(packages["marker"].decode()).exists()


def test_an_approved_package_is_served_by_the_installed_app_never_its_own_code(tmp_path, packages):
    app, fab = InstalledApp(), packages["tampered"]
    add_approval(tmp_path / "approved.json", AppPackage.read(fab), "it", "approved, but its client/ never runs")
    reply, outcome = serve_task(_message(), _context(tmp_path), hashlib.sha256(fab).hexdigest(), fab, app)
    assert outcome.served and app.calls == 1 and reply.has_content()
    assert not Path(packages["marker"].decode()).exists()  # the package's client/app.py was never imported


def test_a_package_whose_bytes_do_not_match_its_hash_is_refused(tmp_path, packages):
    app, fab = InstalledApp(), packages["plain"]
    add_approval(tmp_path / "approved.json", AppPackage.read(fab), "it")
    swapped = packages["tampered"]
    reply, outcome = serve_task(_message(), _context(tmp_path), hashlib.sha256(fab).hexdigest(), swapped, app)
    assert reply.has_error() and app.calls == 0 and "does not match" in outcome.detail


@pytest.mark.parametrize("missing", ["approved-apps", "audit-log", "consortium-key"])
def test_a_hospital_without_an_approved_list_audit_log_or_consortium_key_serves_nothing(tmp_path, packages, missing):
    app, fab = InstalledApp(), packages["plain"]
    context = _context(tmp_path)
    del context.node_config[missing]
    reply, outcome = serve_task(_message(), context, hashlib.sha256(fab).hexdigest(), fab, app)
    assert reply.has_error() and reply.error.reason == NOT_CONFIGURED and app.calls == 0


def test_a_broken_approved_list_refuses(tmp_path, packages):
    (tmp_path / "approved.json").write_text("{broken")
    app, fab = InstalledApp(), packages["plain"]
    reply, outcome = serve_task(_message(), _context(tmp_path), hashlib.sha256(fab).hexdigest(), fab, app)
    assert reply.has_error() and app.calls == 0 and "cannot be read" in outcome.detail
