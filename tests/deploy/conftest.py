"""Helpers for the deployment tests: find every process that belongs to one deployment."""

from __future__ import annotations

from pathlib import Path


def processes_of(flwr_home: Path) -> list[tuple[int, str]]:
    """Running processes whose environment has ``FLWR_HOME=flwr_home`` (every process a
    deployment starts, and every process those start, inherits it), zombies excluded."""
    wanted = f"FLWR_HOME={flwr_home}".encode()
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
