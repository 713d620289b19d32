"""A fedcore process killed outright (SIGKILL) takes its whole process tree with it: the kernel
kills its direct children (PR_SET_PDEATHSIG), :mod:`fedcore.deploy.reaper` their descendants, which
live in sessions of their own and do not watch their parent (what Flower's SuperExec children do
only every 0.2 s, and then shut down slowly)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deploy.conftest import processes_with

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="processes are found via /proc")

# The supervising process: one die_with_parent child, which starts a grandchild in a new session
# that ignores SIGINT/SIGTERM and sleeps; it writes the grandchild's pid, then everything waits.
SUPERVISING = r"""
import os, sys, time
from fedcore.deploy.processes import ProcessSupervisor
mark, value, pid_file, reap = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
child = (
    "import signal, subprocess, sys, time\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
    "signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "time.sleep(600)'], start_new_session=True)\n"
    "open(sys.argv[1], 'w').write(str(g.pid))\n"
    "time.sleep(600)\n"
)
supervisor = ProcessSupervisor(grace=5, mark=(mark, value) if reap else None)
env = {**os.environ, mark: value}
supervisor.start("child", [sys.executable, "-c", child, pid_file], env=env, die_with_parent=True)
time.sleep(600)
"""


def _kill_marked(mark: str, value: str) -> None:
    deadline = time.monotonic() + 10
    while (found := processes_with(mark, value)) and time.monotonic() < deadline:
        for pid, _ in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _run(tmp_path: Path, *, reap: bool) -> tuple[int, list[tuple[int, str]], str]:
    """Start the supervising process, SIGKILL it once the grandchild runs; the grandchild's pid,
    the marked processes still running 10 s later, and the mark's value."""
    mark, value = "FEDCORE_TEST_REAP", f"{os.getpid()}-{reap}-{time.monotonic_ns()}"
    pid_file = tmp_path / f"grandchild-{reap}.pid"
    argv = [sys.executable, "-c", SUPERVISING, mark, value, str(pid_file), "1" if reap else "0"]
    top = subprocess.Popen(argv, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchild = int(pid_file.read_text())
        top.kill()
        top.wait()
        deadline = time.monotonic() + 10
        while processes_with(mark, value) and time.monotonic() < deadline:
            time.sleep(0.1)
        return grandchild, processes_with(mark, value), value
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()
        _kill_marked(mark, value)


def test_a_killed_supervisor_leaves_no_descendant_running(tmp_path):
    grandchild, left, value = _run(tmp_path, reap=True)
    assert left == []
    # and the reaper (which carries no mark: found by its command line) has exited by itself
    deadline = time.monotonic() + 10
    while _with_argument(value) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _with_argument(value) == []


def test_without_the_reaper_the_grandchild_outlives_the_kill(tmp_path):
    # The control: the kernel's PDEATHSIG takes the child only; the grandchild lives on.
    grandchild, left, _ = _run(tmp_path, reap=False)
    assert [pid for pid, _ in left] == [grandchild]


def _with_argument(value: str) -> list[int]:
    """Running processes with ``value`` among their arguments."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and value.encode() in (entry / "cmdline").read_bytes().split(
                b"\0"
            ):
                if (entry / "stat").read_text().rpartition(")")[2].split()[0] != "Z":
                    found.append(int(entry.name))
    return found
