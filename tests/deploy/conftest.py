"""Helpers for the deployment tests: find every process that belongs to one deployment."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path


def processes_with(name: str, value: str) -> list[tuple[int, str]]:
    """Running processes (pid, command line) whose environment holds ``name=value``, zombies
    excluded."""
    wanted = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if wanted in environ and stat.rpartition(")")[2].split()[0] not in ("Z", "X"):
            found.append((int(entry.name), cmdline.strip()))
    return found


def processes_of(flwr_home: Path) -> list[tuple[int, str]]:
    """Running processes whose environment has ``FLWR_HOME=flwr_home`` (every process a
    deployment starts, and every process those start, inherits it), zombies excluded."""
    return processes_with("FLWR_HOME", str(flwr_home))


def end_deploy_local(process: subprocess.Popen, workdirs: list[Path]) -> None:
    """Test clean-up after ``fedcore deploy-local`` runs: kill ``process`` if it still runs, then
    every process a failed check left in each deployment (by process id), and remove the working
    folders (an interrupted or killed deploy-local keeps its own)."""
    if process.poll() is None:
        process.kill()
        process.wait()
    for workdir in workdirs:
        for pid, _ in processes_of(workdir / "flwr-home"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)
