"""The bad-file policy: fail stops with an actionable message, skip counts and reports."""

from __future__ import annotations

import pytest
from rich.console import Console

from shared.data.problems import BadFiles, print_bad_files
from shared.errors import RetuneError


def test_fail_policy_raises_naming_file_reason_and_skip_option():
    bad = BadFiles("fail")
    with pytest.raises(RetuneError, match=r"bad image file /x/a.png: corrupt \(truncated\).*--on-bad-file skip"):
        bad.record("/x/a.png", "corrupt", "truncated")
    assert len(bad) == 1  # recorded before raising


def test_skip_policy_collects_and_summarises(tmp_path, png_files):
    bad = BadFiles("skip")
    assert bad.load(png_files[0]).mode == "L"
    assert bad.load(str(tmp_path / "gone.png")) is None
    (tmp_path / "junk.png").write_bytes(b"junk" * 20)
    assert bad.load(str(tmp_path / "junk.png")) is None
    bad.record("/y/b.png", "missing")
    summary = bad.summary(examples=2)
    assert summary["count"] == 3
    assert summary["by_reason"] == {"missing": 2, "corrupt": 1}
    assert [e["image"] for e in summary["examples"]] == [str(tmp_path / "gone.png"), str(tmp_path / "junk.png")]
    assert summary["examples"][1]["reason"] == "corrupt"


def test_fail_policy_load_raises_and_unknown_policy(tmp_path):
    with pytest.raises(RetuneError, match="gone.png: missing"):
        BadFiles("fail").load(str(tmp_path / "gone.png"))
    with pytest.raises(RetuneError, match="unknown bad-file policy"):
        BadFiles("ignore")  # type: ignore[arg-type]


def test_print_summary_only_when_something_was_skipped():
    console = Console(record=True, width=200)
    print_bad_files(BadFiles("skip"), console)
    assert console.export_text() == ""
    bad = BadFiles("skip")
    for i in range(5):
        bad.record(f"/data/[{i}].png", "missing" if i else "corrupt", "no such file" if i else "bad CRC")
    print_bad_files(bad, console)
    text = console.export_text()
    assert "skipped 5 bad image file(s): 4 missing, 1 corrupt" in text
    assert "/data/[0].png: corrupt (bad CRC)" in text and "... and 2 more" in text
