"""Run an experiment's points as ``fedcore simulate`` subprocesses, N at a time, resumably.

Layout of the experiment folder::

    spec.toml                  the spec as given (a rerun must give the same spec)
    plan.json                  --quick or not, and every point's settings
    runs/<run id>/             the point's run record (what `fedcore simulate --out` writes)
    runs/<run id>.done.json    written when the subprocess has exited: exit status and seconds
    runs/<run id>.audit/       with ``audit = true``, a record-level point's ``fedcore audit``
                               (``audit.json``), with its own ``.done.json``
    logs/                      mode 0700, for the operator only:
    logs/<run id>.log          the point's stdout and stderr, mode 0600 (``<run id>.audit.log``
                               for its audit)

A point's console output shows every round's training loss and how many sites replied, which the
privacy guarantee of a site-level DP run does not cover (the run record keeps them in its 0600
``operator.jsonl`` for that reason): so the logs are written owner-only, in an owner-only folder,
whatever the umask. What the folder publishes (``results.csv``, ``summary.md``, the plots) is read
from the run records' public files only: accuracies and epsilons.

A point is finished when its ``.done.json`` records an exit that is a result, whatever that result
(a run stopped early by its budget, or failed, is a result, not a failure to retry). An exit that
says a signal stopped the run (:func:`fedcore.lifecycle.stopped_by_signal`: status 130, 143, 129,
or killed) is no result: that point runs again, as does a point that was interrupted with the
experiment (run folder, no ``.done.json``). A point that runs again loses its partial record and
starts from the beginning, since ``fedcore simulate`` never continues a run here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedcore._files import PRIVATE_MODE, PUBLIC_MODE, atomic_write, json_bytes
from fedcore.errors import ConfigError
from fedcore.experiment.plan import Point
from fedcore.experiment.spec import ExperimentSpec
from fedcore.lifecycle import stopped_by_signal

POLL_SECONDS = 0.5
LOGS = "logs"  # the operator-only folder of the points' console output
PRIVATE_FOLDER_MODE = 0o700


@dataclass(frozen=True, slots=True)
class PointOutcome:
    """How the subprocess of one point (its run, or its audit) ended: exit status and seconds."""

    run_id: str
    returncode: int
    seconds: float

    @property
    def finished(self) -> bool:
        """Whether this is a result to keep (completed, budget spent, failed), not a run that a
        signal stopped (:func:`~fedcore.lifecycle.stopped_by_signal`), which runs again."""
        return not stopped_by_signal(self.returncode)


AUDIT = ".audit"  # the suffix of a point's audit folder, log and done file


def run_dir(out: Path, run_id: str, suffix: str = "") -> Path:
    return out / "runs" / f"{run_id}{suffix}"


def done_path(out: Path, run_id: str, suffix: str = "") -> Path:
    return out / "runs" / f"{run_id}{suffix}.done.json"


def log_path(out: Path, run_id: str, suffix: str = "") -> Path:
    """Where the console output of a point (or its audit) goes: ``logs/``, owner-only."""
    return out / LOGS / f"{run_id}{suffix}.log"


def read_outcome(out: Path, run_id: str, suffix: str = "") -> PointOutcome | None:
    """The recorded outcome of a point (or its audit) whose subprocess exited, or None if none is
    recorded. It may be no result (:attr:`PointOutcome.finished`)."""
    try:
        doc = json.loads(done_path(out, run_id, suffix).read_text())
        return PointOutcome(run_id, int(doc["returncode"]), float(doc["seconds"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_finished(out: Path, run_id: str, suffix: str = "") -> bool:
    """Whether a point (or its audit) has a result that a rerun keeps."""
    outcome = read_outcome(out, run_id, suffix)
    return outcome is not None and outcome.finished


def stopped_points(
    points: Sequence[Point], *, out: Path, suffix: str = ""
) -> list[tuple[Point, PointOutcome]]:
    """The points (or audits) whose recorded run a signal stopped: no result, so they run again."""
    found = []
    for point in points:
        outcome = read_outcome(out, point.run_id, suffix)
        if outcome is not None and not outcome.finished:
            found.append((point, outcome))
    return found


def exit_text(returncode: int) -> str:
    """How a subprocess ended, in words: ``exit 143``, or ``killed by SIGKILL`` (a negative
    status, as :mod:`subprocess` reports a death by signal)."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"


def private_folder(path: Path) -> Path:
    """Create ``path`` (and its parents) if needed and give it mode 0700, whatever the umask.
    Raises :class:`ConfigError` if it is a symbolic link or another user's folder."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_FOLDER_MODE)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{str(path)!r} is not a plain folder; the point logs need one")
    if info.st_uid != os.geteuid():
        raise ConfigError(f"{str(path)!r} is owned by uid {info.st_uid}, not by this user")
    os.chmod(path, PRIVATE_FOLDER_MODE)
    return path


def _adopt_old_logs(out: Path, logs: Path) -> None:
    """Move the logs an older fedcore left world-readable beside the run records into ``logs``,
    owner-only."""
    for old in (out / "runs").glob("*.log"):
        if old.is_file() and not old.is_symlink():
            os.chmod(old, PRIVATE_MODE)
            os.replace(old, logs / old.name)


def prepare(out: Path, *, spec_text: str, spec: ExperimentSpec, points: Sequence[Point]) -> None:
    """Create the folder, or check that it holds this same experiment. Raises ConfigError."""
    spec_file = out / "spec.toml"
    plan_file = out / "plan.json"
    plan_doc = {
        "name": spec.name,
        "quick": spec.quick,
        "points": {
            p.run_id: {
                "swept": {k: _jsonable(v) for k, v in p.swept.items()},
                "settings": dict(p.settings),
            }
            for p in points
        },
    }
    if spec_file.exists():
        if spec_file.read_text() != spec_text:
            raise ConfigError(
                f"{str(out)!r} holds another experiment (its spec.toml differs); choose another --out"
            )
        try:
            previous = json.loads(plan_file.read_text())
        except (OSError, ValueError):
            previous = {}
        if previous.get("quick") != spec.quick:
            was = "with" if previous.get("quick") else "without"
            raise ConfigError(f"{str(out)!r} was run {was} --quick; rerun it the same way")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    _adopt_old_logs(out, private_folder(out / LOGS))
    spec_file.write_text(spec_text)
    plan_file.write_text(json.dumps(plan_doc, indent=2) + "\n")


def _jsonable(value: object) -> object:
    from fedcore.experiment.plan import display

    return value if value is None or isinstance(value, bool | int | float) else display(value)


def simulate_command(point: Point, *, out: Path) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "fedcore.cli",
        "simulate",
        "--out",
        str(run_dir(out, point.run_id)),
    ]
    for item in point.overrides():
        command += ["--set", item]
    return command


def audit_command(point: Point, *, out: Path, canaries: int | None) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "fedcore.cli",
        "audit",
        "--out",
        str(run_dir(out, point.run_id, AUDIT)),
    ]
    if canaries is not None:
        command += ["--canaries", str(canaries)]
    for item in point.overrides():
        command += ["--set", item]
    return command


@dataclass
class _Running:
    point: Point
    process: subprocess.Popen[bytes]
    started: float


def _open_log(path: Path) -> int:
    """A descriptor of ``path``, emptied, mode 0600 whatever the umask or its old mode; never a
    symbolic link."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, PRIVATE_MODE)
    os.fchmod(fd, PRIVATE_MODE)
    return fd


def _start(
    point: Point, argv: list[str], *, out: Path, suffix: str, env: dict[str, str]
) -> _Running:
    """Start a point's subprocess afresh (a partial record left by an earlier try is removed),
    its output into its owner-only log."""
    target = run_dir(out, point.run_id, suffix)
    if target.exists():  # interrupted before: its partial record cannot be continued
        shutil.rmtree(target)
    private_folder(out / LOGS)
    fd = _open_log(log_path(out, point.run_id, suffix))
    try:
        process = subprocess.Popen(argv, stdout=fd, stderr=subprocess.STDOUT, env=env)
    finally:
        os.close(fd)
    return _Running(point, process, time.monotonic())


def _record(item: _Running, *, out: Path, suffix: str) -> PointOutcome:
    """Write the ``.done.json`` of a point whose subprocess has exited; its outcome."""
    outcome = PointOutcome(
        item.point.run_id, int(item.process.returncode), time.monotonic() - item.started
    )
    doc = {"returncode": outcome.returncode, "seconds": round(outcome.seconds, 2)}
    atomic_write(done_path(out, outcome.run_id, suffix), json_bytes(doc), mode=PUBLIC_MODE)
    return outcome


def _stop(running: Sequence[_Running]) -> None:
    """Stop the subprocesses still running (the experiment was interrupted)."""
    for item in running:
        item.process.terminate()
    for item in running:
        try:
            item.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            item.process.kill()


def run_points(
    points: Sequence[Point],
    *,
    out: Path,
    jobs: int,
    suffix: str = "",
    command: Callable[[Point, Path], list[str]] = lambda point, out: simulate_command(
        point, out=out
    ),
    on_start: Callable[[Point], None] = lambda p: None,
    on_poll: Callable[[Point], None] = lambda p: None,
    on_done: Callable[[Point, PointOutcome], None] = lambda p, o: None,
) -> list[PointOutcome]:
    """Run every unfinished point, ``jobs`` at a time; returns the outcomes of those it ran.

    Finished points (:func:`is_finished`) are skipped without calling anything. ``command`` gives
    the subprocess of a point (default :func:`simulate_command`; tests put a stand-in there);
    ``suffix`` names what it writes (``""`` for the run, :data:`AUDIT` for the audit). ``on_poll``
    is called for each running point about twice a second (for a progress display). Raises
    :class:`ConfigError` for ``jobs < 1``; if interrupted, stops what it started.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    todo = [p for p in points if not is_finished(out, p.run_id, suffix)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0")}
    running: list[_Running] = []
    outcomes: list[PointOutcome] = []
    try:
        while todo or running:
            while todo and len(running) < jobs:
                point = todo.pop(0)
                running.append(_start(point, command(point, out), out=out, suffix=suffix, env=env))
                on_start(point)
            time.sleep(POLL_SECONDS)
            for item in list(running):
                on_poll(item.point)
                if item.process.poll() is None:
                    continue
                running.remove(item)
                outcomes.append(_record(item, out=out, suffix=suffix))
                on_done(item.point, outcomes[-1])
    finally:
        _stop(running)
    return outcomes
