"""The launcher stops exactly what it started: a process is recognised by pid and kernel start time, and its whole
process group (what it spawned) goes with it."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace

from deploy.processes import Process, spawn, start_time, stop


def _sleeper(tmp_path, name: str, children: int = 0) -> Process:
    code = ("import subprocess, sys, time\n"
            f"kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']) for _ in range({children})]\n"
            "print(' '.join(str(k.pid) for k in kids), flush=True)\n"
            "time.sleep(60)\n")
    return spawn(name, [sys.executable, "-c", code], tmp_path / f"{name}.log", dict(os.environ), tmp_path)


def test_stop_takes_the_process_and_what_it_spawned(tmp_path):
    proc = _sleeper(tmp_path, "parent", children=2)
    assert proc.alive()
    deadline = time.monotonic() + 30
    while not (tmp_path / "parent.log").read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    kids = [int(pid) for pid in (tmp_path / "parent.log").read_text().split()]
    assert all(start_time(pid) for pid in kids)
    assert stop([proc], grace=5) == ["parent"]
    assert not proc.alive() and not any(start_time(pid) for pid in kids)


def test_a_recorded_process_whose_pid_was_reused_is_never_signalled(tmp_path):
    proc = _sleeper(tmp_path, "stranger")
    impostor = replace(proc, started=proc.started - 1)  # same pid, another start time: not the one we started
    try:
        assert not impostor.alive()
        assert stop([impostor], grace=1) == []
        assert proc.alive()
    finally:
        stop([proc], grace=5)
    assert not proc.alive()
