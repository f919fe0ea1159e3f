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
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN); " if stubborn else ""
    kid = f"import os, signal, time; {ignore}open(f'{{os.getpid()}}.ready', 'w').close(); time.sleep(60)"
    code = ("import subprocess, sys, time\n"
            f"kids = [subprocess.Popen([sys.executable, '-c', {kid!r}]) for _ in range({children})]\n"
            "print(' '.join(str(k.pid) for k in kids), flush=True)\n"
            "time.sleep(60)\n")
    return spawn(name, [sys.executable, "-c", code], tmp_path / f"{name}.log", dict(os.environ), tmp_path)


def _kids(proc: Process) -> list[int]:
    """The pids the sleeper spawned, once it has written them and each child is set up (a stubborn one ignores
    SIGTERM only from then on)."""
    deadline = time.monotonic() + 30
    while not (log := Path(proc.log).read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    kids = [int(pid) for pid in log.split()]
    while not all((Path(proc.log).parent / f"{pid}.ready").exists() for pid in kids):
        assert time.monotonic() < deadline
        time.sleep(0.05)
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
