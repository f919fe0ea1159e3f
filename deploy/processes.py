"""Processes the launcher starts and, later, stops: exactly those, recognised by pid *and* start time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Process:
    """One started process: its service name, argv, log file, pid and kernel start time (guards pid reuse)."""

    name: str
    argv: list[str]
    log: str
    pid: int = 0
    started: int = 0

    def alive(self) -> bool:
        """Running, and still the process that was started (not a later one that reused the pid)."""
        return bool(self.pid) and start_time(self.pid) == self.started

    def as_dict(self) -> dict:
        return asdict(self)


def _stat_fields(path: Path) -> list[str] | None:
    """The fields of a ``/proc/PID/stat`` file after the command name (state first), None if the process is gone."""
    try:
        stat = path.read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if no such live process."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return None if fields is None or fields[0] == "Z" else int(fields[19])


def spawn(name: str, argv: list[str], log: Path, env: dict[str, str], cwd: Path) -> Process:
    """Start ``argv`` in its own session (so its children stop with it), output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True)
    started = None
    for _ in range(50):  # /proc entry appears at once; a few retries cover slow machines
        started = start_time(proc.pid)
        if started is not None:
            break
        time.sleep(0.01)
    return Process(name, argv, str(log), proc.pid, started or 0)


def running_groups() -> set[int]:
    """Ids of the process groups with a running member (zombies, which only wait to be collected, do not count)."""
    return {int(fields[2]) for stat in Path("/proc").glob("[0-9]*/stat")
            if (fields := _stat_fields(stat)) is not None and fields[0] != "Z"}


def stop(processes: list[Process], grace: float = 10.0) -> list[str]:
    """SIGTERM each live process's group, SIGKILL what is left of it after ``grace`` seconds, and return once
    every member of those groups has exited (or 5 s after the SIGKILL); returns the names stopped. Processes not
    started by us (dead, or pid reused) are never signalled; a group outlives its leader only while one of what
    the leader spawned still runs, and no pid can become a new group's id before then."""
    live = [p for p in processes if p.alive()]

    def running() -> list[Process]:
        groups = running_groups()  # one look at /proc for all of them
        return [p for p in live if p.alive() or p.pid in groups]

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for proc in running():
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while running() and time.monotonic() < deadline:
            _reap()
            time.sleep(0.1)
        if not running():
            break
    return [p.name for p in live]


def _reap() -> None:
    """Collect exited children of this process (a launcher that started them), so they do not linger."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False
