"""Which run records this process's servers are writing, and whether the process is exiting under
them: one home for the race between a server thread and its process's exit.

``flwr stop`` on a simulation SuperLink ends ``flwr-simulation`` while its ServerApp thread waits
for replies; the exit handler (:mod:`fedcore.federation.simulation.ray_cleanup`) closes the open
records as interrupted and stops Ray. The invariant kept here: **a run whose process is stopped
from outside is closed as interrupted, by exactly one closer.** Two orders break it without care:

- the exit handler closed the record and the server thread, still running, closes it again
  (:func:`claimed`: the thread leaves a record the exit closed);
- Ray dies first (seen once under load in CI, "Owner's node has crashed"; which process took it
  down was not established) and the server thread, every site failing with ``ActorDiedError``,
  reaches ``max_failed_rounds`` and
  would close the record as failed a moment before the exit handler runs. In ``flwr-simulation`` a
  server that is about to close a run as failed first waits, up to :data:`EXIT_WAIT` seconds, for
  an exit to claim the record (:func:`exit_claims`); elsewhere (``fedcore simulate``, a
  deployment's ServerApp) nothing waits.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SIMULATION_PROCESS = "flwr-simulation"  # Flower's program for one simulated run
EXIT_WAIT = 30.0  # how long a failing run in flwr-simulation waits for an exit to claim it

_lock = threading.Lock()  # held while the exit closes records, and to read what it closed
_exiting = threading.Event()  # the process is exiting under its servers
_writing: set[Path] = set()  # the records run_server is writing in this process
_closed: set[Path] = set()  # ... and those the exit closed under it


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """``path`` is written by a server of this process for the duration."""
    _writing.add(path)
    try:
        yield
    finally:
        _writing.discard(path)
        _closed.discard(path)


@contextmanager
def exit_closing() -> Iterator[list[Path]]:
    """The exit's side: marks the process as exiting and yields, under the lock, the records still
    written; the caller closes each and calls :func:`mark_closed` for it."""
    _exiting.set()
    with _lock:
        yield sorted(_writing)


def mark_closed(path: Path) -> None:
    """The exit closed ``path`` (called under :func:`exit_closing`)."""
    _closed.add(path)


def claimed(path: Path) -> bool:
    """Whether the exit closed ``path`` already (the server thread then leaves it)."""
    with _lock:
        return path in _closed


def in_simulation_process() -> bool:
    """Whether this process is Flower's ``flwr-simulation`` (a simulation SuperLink's run)."""
    return Path(sys.argv[0]).name == SIMULATION_PROCESS


def exit_claims(path: Path, *, wait: float = EXIT_WAIT) -> bool:
    """Whether the process's exit closes ``path``, so that a server about to close it as failed
    leaves it: at once if the exit closed it already; in ``flwr-simulation`` (where Ray can die
    before the exit handler runs), after waiting up to ``wait`` seconds for an exit."""
    if claimed(path):
        return True
    if not in_simulation_process() or not _exiting.wait(wait):
        return False
    return claimed(path)
