"""App-package approval: the package hash, its review (files, diff, hospital code), the approved list."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from client.approval import code_manifest, hospital_code_diff, running_code
from shared.app_packages import (AppPackage, add_approval, diff_files, find_approval, pending_path, read_approved,
                                 store_pending)
from shared.errors import RetuneError
from tests.conftest import fab_of, make_app

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def package_bytes(tmp_path_factory) -> bytes:
    return fab_of(make_app(tmp_path_factory.mktemp("app") / "retune-fl"))


def test_runtime_hash_covers_the_hospital_code_only_and_is_reproducible_with_sha256sum():
    manifest = running_code()
    paths = {f.path for f in manifest.files}
    assert {"client/app.py", "client/runtime.py", "shared/wire.py", "shared/artifact.py"} <= paths
    assert any(p.startswith("shared/assets/backbones/") and p.endswith(".safetensors") for p in paths)
    assert not any(p.startswith(("research/", "server/", "deploy/")) or p.split("/")[1] in ("phantom", "pretrain")
                   for p in paths), "research tools and the server are not part of what a hospital reviews"
    assert not any("__pycache__" in p for p in paths)
    assert code_manifest(ROOT).code_hash == manifest.code_hash
    cmd = ("find client shared -type f \\( -name '*.py' -o -name '*.json' -o -path '*/assets/*' \\) "
           "-not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum | sha256sum")
    out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == manifest.code_hash


def test_package_hash_is_the_sha256_flower_gives_the_fab_and_lists_its_files(package_bytes):
    package = AppPackage.read(package_bytes)
    assert package.fab_hash == hashlib.sha256(package_bytes).hexdigest()
    assert package.app == "retune-fl/retune-fl 0.1.0"
    assert package.run_config["backbone"] == "retune-minilm-phantom"
    files = package.manifest.as_dict()
    assert {"pyproject.toml", "client/app.py", "server/app.py"} <= set(files)
    assert files["client/app.py"]["sha256"] == hashlib.sha256((ROOT / "client/app.py").read_bytes()).hexdigest()
    assert hospital_code_diff(package).empty  # built from the installed code


def test_a_package_with_modified_hospital_code_shows_the_difference(tmp_path, package_bytes):
    def tamper(app: Path) -> None:
        with (app / "client" / "app.py").open("a") as f:
            f.write("\nopen('/tmp/exfiltrate', 'w')\n")
        (app / "shared" / "extra.py").write_text("x = 1\n")

    modified = AppPackage.read(fab_of(make_app(tmp_path / "retune-fl", tamper)))
    original = AppPackage.read(package_bytes)
    assert modified.fab_hash != original.fab_hash
    diff = hospital_code_diff(modified)
    assert diff.changed == ("client/app.py",) and diff.added == ("shared/extra.py",) and diff.removed == ()
    since = diff_files(original.manifest.as_dict(), modified.manifest.as_dict())
    assert "client/app.py" in since.changed and since.added == ("shared/extra.py",)


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("data, problem", [
    (b"not a zip at all", "not a Flower app package"),
    (_zip({"client/app.py": b"x"}), "not a Flower app package"),  # no pyproject.toml
    (_zip({"pyproject.toml": b"[project]\n", "../escape.py": b"x"}), "outside itself"),
])
def test_malformed_packages_are_refused_without_unpacking(data, problem):
    with pytest.raises(RetuneError, match=problem):
        AppPackage.read(data)


def test_approved_list_round_trip_and_refuses_other_formats(tmp_path, package_bytes):
    package = AppPackage.read(package_bytes)
    path = tmp_path / "it" / "approved.json"
    assert read_approved(path) == []
    entry = add_approval(path, package, "dr-it", "ticket 42")
    assert json.loads(path.read_text())["approved"] == [entry]
    assert (entry["approved_by"], entry["note"], entry["app"]) == ("dr-it", "ticket 42", package.app)
    assert entry["files"] == package.manifest.as_dict()
    assert find_approval(path, package.fab_hash) == entry and find_approval(path, "0" * 64) is None
    for broken in ("{not json", "[1, 2]", json.dumps({"approved": [{"code_hash": "ab"}]})):  # v1 lists too
        path.write_text(broken)
        with pytest.raises(RetuneError, match="not valid"):
            read_approved(path)


def test_a_refused_package_is_kept_once_for_review(tmp_path, package_bytes):
    approved = tmp_path / "approved.json"
    digest = hashlib.sha256(package_bytes).hexdigest()
    kept = store_pending(approved, package_bytes, digest)
    assert kept == pending_path(approved, digest) and kept.read_bytes() == package_bytes
    kept.write_bytes(b"reviewed copy")
    assert store_pending(approved, package_bytes, digest).read_bytes() == b"reviewed copy"
