"""Processes fedcore starts, and stopping every one of them by process id.

Theory of operation. Each process is started in a session (and process group) of its own, so a
Ctrl-C at the terminal reaches only fedcore, which then stops its children in order instead of
having them die in a heap. Flower's daemons start children of their own (``flower-superexec``,
which starts ``flwr-serverapp`` / ``flwr-clientapp``), also in new sessions, so killing a process
group is not enough. To stop a process, :class:`ProcessSupervisor` freezes it (``SIGSTOP``), then
walks ``/proc`` for its descendants, freezing each as it finds it and waiting until each has
stopped, and walks again until it finds no new one: a frozen process cannot start a child, so none
escapes the snapshot (a SuperExec launching a ClientApp the moment its SuperNode is stopped; a
child whose parent dies is handed to init and is no longer anyone's descendant). Every process of
the tree then gets ``SIGTERM`` while frozen and ``SIGCONT`` after, so each acts on the signal
before it runs anything else, and no daemon's shutdown waits on a frozen child; whichever still
runs after the grace period gets ``SIGKILL``. A supervisor given a ``mark`` (an environment
variable every process it starts, and every process those start, inherits) also sweeps, last, for
any process still carrying it. Should fedcore itself die (even by SIGKILL), the kernel kills the
processes started with ``die_with_parent`` and :mod:`fedcore.deploy.reaper` the rest of the tree.

Every signal goes to a process id that fedcore recorded together with the process's start time
(``/proc/PID/stat`` field 22): a pid the kernel has since given to another process is never
signalled. Zombies (exited, not yet reaped by their parent) count as stopped.

On Linux only (``/proc``); elsewhere descendants are not tracked and only the direct children are
stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from fedcore.deploy.pids import (
    ProcessId,
    freeze,
    marked,
    stat_fields,
)
from fedcore.errors import ConfigError

_PROC = Path("/proc")


@dataclass(slots=True)
class ManagedProcess:
    """A process fedcore started: its name, command, log file and ``Popen`` handle."""

    name: str
    argv: tuple[str, ...]
    popen: subprocess.Popen[bytes]
    log_path: Path | None
    ident: ProcessId
    descendants: set[ProcessId] = field(default_factory=set)
    stop_signal: int = signal.SIGTERM  # what :meth:`ProcessSupervisor.stop` sends first

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def returncode(self) -> int | None:
        return self.popen.poll()

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the process's log ("" if it has none)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class ProcessSupervisor:
    """Starts processes and guarantees they are stopped: use it as a context manager.

    Leaving the ``with`` block, normally or by any exception (``KeyboardInterrupt`` included),
    stops every process started through it, newest first, with its descendants.
    :meth:`stop_all` may be called earlier; it is idempotent. After it, the supervisor refuses to
    start processes (:class:`~fedcore.errors.ConfigError`).
    """

    def __init__(self, *, grace: float = 10.0, mark: tuple[str, str] | None = None) -> None:
        self.grace = grace
        self.mark = mark  # (name, value) of an environment variable every started process has
        self.processes: list[ManagedProcess] = []
        self._closed = False
        self._stopped = False  # stop_all has run to its end: nothing of ours is left to find
        self._reaper: tuple[subprocess.Popen[bytes], int] | None = None  # fedcore.deploy.reaper

    def __enter__(self) -> ProcessSupervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log_path: Path | None = None,
        stdout: int | IO[bytes] | None = None,
        die_with_parent: bool = False,
        stop_signal: int = signal.SIGTERM,
    ) -> ManagedProcess:
        """Start ``argv`` in a new session; output goes to ``log_path`` (or ``stdout``, e.g. PIPE;
        with neither, to this process's stdout and stderr).

        With ``die_with_parent`` (Linux), the kernel kills the process when this one dies, even by
        SIGKILL, so a killed ``fedcore`` leaves no run going on behind it; with a ``mark`` as well,
        the first such start also starts a :mod:`fedcore.deploy.reaper`, which then kills the
        process's descendants too (the kernel kills only the direct children). ``stop_signal`` is what
        :meth:`stop` sends first (SIGKILL for a process with nothing to flush, whose own shutdown
        would only print the tracebacks of its dying workers).

        Raises :class:`ConfigError` if the program cannot be started or the supervisor was
        already stopped; nothing is left running then.
        """
        if self._closed:
            raise ConfigError(f"cannot start {name}: the deployment is being stopped")
        if die_with_parent:
            self._start_reaper()
        log_file: IO[bytes] | None = None
        try:
            if log_path is not None:
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log_file = log_path.open("ab")
            popen = subprocess.Popen(
                list(argv),
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log_file if log_file is not None else stdout,
                stderr=subprocess.STDOUT if (log_file is not None or stdout is not None) else None,
                start_new_session=True,
                preexec_fn=_die_with_parent if die_with_parent else None,
            )
        except OSError as exc:
            raise ConfigError(f"cannot start {name} ({argv[0]}): {exc}") from exc
        finally:
            if log_file is not None:
                log_file.close()  # the child holds its own descriptor
        process = ManagedProcess(
            name=name,
            argv=tuple(argv),
            popen=popen,
            log_path=log_path,
            ident=ProcessId.of(popen.pid),
            stop_signal=stop_signal,
        )
        self.processes.append(process)
        return process

    def _start_reaper(self) -> None:
        """With a mark, once: the kernel kills only the direct children of a dying fedcore, the
        reaper the rest (:mod:`fedcore.deploy.reaper`)."""
        if self.mark is not None and self._reaper is None and _PROC.is_dir():
            from fedcore.deploy import reaper

            self._reaper = reaper.start(*self.mark)

    def refresh_descendants(self) -> None:
        """Record the current descendants of every running process (call it now and then)."""
        tree = _children_map()
        for process in self.processes:
            if process.running():
                process.descendants |= {
                    ProcessId.of(pid) for pid in _descendants(process.pid, tree)
                }

    def stop(self, process: ManagedProcess) -> int | None:
        """Stop one process and its descendants; return its exit status (None if it lives on)."""
        # A process stopped by SIGKILL (nothing in it needs a clean exit) has descendants that
        # need none either: they get SIGKILL too, not SIGTERM and up to `grace` seconds.
        first = signal.SIGKILL if process.stop_signal == signal.SIGKILL else signal.SIGTERM
        signalled = False
        if process.running():
            # The process, then its whole tree, frozen before any is signalled, so none of them
            # can start a child that the snapshot would miss; then all are signalled while frozen
            # and continued together (a continued process acts on the signal before anything
            # else), so that a daemon's shutdown does not wait on a frozen child.
            freeze({process.ident})
            process.descendants |= _freeze_descendants(process.pid)
            for ident in process.descendants:
                ident.signal(first)
            with contextlib.suppress(ProcessLookupError):
                process.popen.send_signal(process.stop_signal)
            for ident in (process.ident, *process.descendants):
                ident.signal(signal.SIGCONT)
            signalled = True
            try:
                process.popen.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.popen.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.popen.wait(timeout=self.grace)
        _stop_ids(process.descendants, grace=self.grace, first=None if signalled else first)
        return process.popen.poll()

    def stop_all(self) -> None:
        """Stop every process started here, newest first (clients before the server). Idempotent.

        Signals that arrive meanwhile (a second Ctrl-C) are held back until every process is
        stopped.
        """
        self._closed = True
        if self._stopped:
            return
        with _signals_deferred():
            self.refresh_descendants()
            for process in reversed(self.processes):
                self.stop(process)
            if self.mark is not None:
                for _sweep in range(3):  # a straggler's own child, started before it froze
                    found = marked(*self.mark)
                    if not found:
                        break
                    freeze(found)
                    _stop_ids(found, grace=min(self.grace, 3.0))
            if self._reaper is not None:
                from fedcore.deploy import reaper

                reaper.release(*self._reaper)
                self._reaper = None
            self._stopped = True

    def leftovers(self) -> list[ProcessId]:
        """Processes started here, recorded as their descendants, or carrying the mark, that still
        run."""
        ids = [p.ident for p in self.processes] + [d for p in self.processes for d in p.descendants]
        if self.mark is not None:
            ids += marked(*self.mark)
        return sorted({i for i in ids if i.alive()}, key=lambda i: i.pid)


def stop_descendants(pid: int | None = None, *, grace: float = 3.0) -> set[ProcessId]:
    """Stop every descendant of ``pid`` (default: this process) by process id; return those found.

    Each descendant is frozen (SIGSTOP) as the walk finds it, and the walk repeats until it finds
    no new one, so no process can start a child that escapes it (a child whose parent dies is
    handed to init and is no longer anyone's descendant). Then every one found gets SIGTERM (and
    SIGCONT, so it can act on it), and SIGKILL after ``grace`` seconds if it still runs. On Linux
    only (``/proc``); elsewhere nothing is found.
    """
    found = _freeze_descendants(os.getpid() if pid is None else pid)
    _stop_ids(found, grace=grace)
    return found


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.2,
    failed: Callable[[], str | None] = lambda: None,
) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` passes (False).

    ``failed`` is checked on every poll; if it returns a message, :class:`ConfigError` is raised
    with it (e.g. the process being waited for has exited).
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        reason = failed()
        if reason:
            raise ConfigError(reason)
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(BaseException):
    """A signal asked fedcore to stop (raised in the main thread by :func:`signals_stop`); like
    KeyboardInterrupt, not an Exception, so only the code that stops processes catches it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_stop() -> Iterator[None]:
    """Inside, SIGINT, SIGTERM and SIGHUP raise :class:`Stopped` in the main thread, so
    ``finally`` blocks (a supervisor stopping its processes) run."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back while clean-up runs (main thread only; elsewhere a no-op)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_signals_deferred = signals_deferred


def _die_with_parent() -> None:
    """In the child before exec: ask the kernel for SIGKILL when the parent dies (PR_SET_PDEATHSIG)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _freeze_descendants(root: int) -> set[ProcessId]:
    """Freeze every descendant of ``root``, each as the walk finds it, walking again until no new
    one appears; return them (still frozen: :func:`_stop_ids` continues them)."""
    found: set[ProcessId] = set()
    while True:
        new = {ProcessId.of(p) for p in _descendants(root, _children_map())}
        new = {i for i in new if i.start_time is not None and i.alive()} - found  # no zombies
        if not new:
            return found
        freeze(new)
        found |= new


def _stop_ids(ids: set[ProcessId], *, grace: float, first: int | None = signal.SIGTERM) -> None:
    """Send ``first`` (then SIGCONT, so a frozen process acts on it; None: they have been sent
    it already), wait up to ``grace`` seconds, SIGKILL whichever still runs, and wait briefly until
    those are gone."""
    alive = [i for i in ids if i.alive()]
    if first is not None:
        for ident in alive:
            ident.signal(first)
        for ident in alive:
            ident.signal(signal.SIGCONT)
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [i for i in alive if i.alive()]
    for ident in alive:
        ident.signal(signal.SIGKILL)
    # SIGKILL is delivered asynchronously: wait (briefly) until each is gone, so that "stopped"
    # means no longer running when this returns (a loaded machine takes a moment to reap).
    deadline = time.monotonic() + 5.0
    while alive and time.monotonic() < deadline:
        alive = [i for i in alive if i.alive()]
        if alive:
            time.sleep(0.02)


def _children_map() -> dict[int, list[int]]:
    """``{parent pid: [child pids]}`` for every process on the machine (empty without /proc)."""
    tree: dict[int, list[int]] = {}
    if not _PROC.is_dir():
        return tree
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        stat = stat_fields(int(entry.name))
        if stat is not None:
            tree.setdefault(int(stat[3]), []).append(int(entry.name))
    return tree


def _descendants(pid: int, tree: Mapping[int, list[int]]) -> list[int]:
    found: list[int] = []
    stack = list(tree.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(tree.get(child, []))
    return found
