"""Processes by pid *and* start time, read from ``/proc``: the primitives that
:mod:`fedcore.deploy.processes` (which stops what fedcore started) and :mod:`fedcore.deploy.reaper`
(which takes a dead fedcore's tree down) share. A pid the kernel has since given to another process
is never signalled; zombies count as stopped. On Linux only; elsewhere nothing is found."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class ProcessId:
    """A process, identified by pid *and* start time, so a reused pid is never mistaken for it."""

    pid: int
    start_time: int | None  # clock ticks since boot; None where /proc is not available

    @classmethod
    def of(cls, pid: int) -> ProcessId:
        return cls(pid, start_time(pid))

    def alive(self) -> bool:
        """Whether this very process still runs (a zombie does not count)."""
        if not _PROC.is_dir():
            return pid_exists(self.pid)
        stat = stat_fields(self.pid)
        if stat is None:
            return False
        state, start = stat[2], int(stat[21])
        if self.start_time is not None and start != self.start_time:
            return False
        return state not in ("Z", "X")

    def signal(self, signum: int) -> None:
        """Send ``signum`` if this process still runs; a vanished process is not an error."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signum)


def freeze(ids: set[ProcessId], *, timeout: float = 1.0) -> None:
    """SIGSTOP each, then wait (up to ``timeout``) until each has stopped or is gone: the signal
    takes effect only when the process next leaves the kernel, so a ``fork`` under way completes
    first and its child is visible to a walk made after this returns."""
    for ident in ids:
        ident.signal(signal.SIGSTOP)
    pending = list(ids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = [
            i for i in pending if i.alive() and (stat_fields(i.pid) or ["", "", "X"])[2] != "T"
        ]
        if pending:
            time.sleep(0.005)


def marked(name: str, value: str) -> set[ProcessId]:
    """Running processes (this one excluded) whose environment holds ``name=value``."""
    wanted = f"{name}={value}".encode()
    found: set[ProcessId] = set()
    if not _PROC.is_dir():
        return found
    for entry in _PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in environ:
            ident = ProcessId.of(int(entry.name))
            if ident.start_time is not None and ident.alive():
                found.add(ident)
    return found


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat (the command name, which may hold spaces, as one field)."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    head, _, rest = text.rpartition(")")
    pid_part, _, comm = head.partition(" (")
    return [pid_part, comm, *rest.split()]


def start_time(pid: int) -> int | None:
    stat = stat_fields(pid)
    return int(stat[21]) if stat is not None else None


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
