"""The launcher stops exactly what it started: a process is recognised by pid and kernel start time, and its whole
process group (what it spawned) goes with it."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from deploy.processes import Process, spawn, start_time, stop


def _sleeper(tmp_path, name: str, children: int = 0, stubborn: bool = False) -> Process:
    kid = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)" if stubborn
           else "import time; time.sleep(60)")
    code = ("import subprocess, sys, time\n"
            f"kids = [subprocess.Popen([sys.executable, '-c', {kid!r}]) for _ in range({children})]\n"
            "print(' '.join(str(k.pid) for k in kids), flush=True)\n"
            "time.sleep(60)\n")
    return spawn(name, [sys.executable, "-c", code], tmp_path / f"{name}.log", dict(os.environ), tmp_path)


def _kids(proc: Process) -> list[int]:
    """The pids the sleeper spawned, once it has written them (and the children have set themselves up)."""
    deadline = time.monotonic() + 30
    while not (log := Path(proc.log).read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # a stubborn child ignores SIGTERM only once its interpreter has started
    kids = [int(pid) for pid in log.split()]
    assert all(start_time(pid) for pid in kids)
    return kids


def test_stop_takes_the_process_and_what_it_spawned(tmp_path):
    proc = _sleeper(tmp_path, "parent", children=2)
    assert proc.alive()
    kids = _kids(proc)
    assert stop([proc], grace=5) == ["parent"]
    assert not proc.alive() and not any(start_time(pid) for pid in kids)  # gone when stop returns, not soon after


def test_children_that_ignore_sigterm_are_killed_after_their_parent_exits(tmp_path):
    proc = _sleeper(tmp_path, "parent", children=2, stubborn=True)
    kids = _kids(proc)
    started = time.monotonic()
    assert stop([proc], grace=1) == ["parent"]
    assert not proc.alive() and not any(start_time(pid) for pid in kids)
    assert time.monotonic() - started < 10


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
