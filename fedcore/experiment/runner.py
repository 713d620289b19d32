"""Run an experiment's points as ``fedcore simulate`` subprocesses, N at a time, resumably.

Layout of the experiment folder::

    spec.toml                  the spec as given (a rerun must give the same spec)
    plan.json                  --quick or not, and every point's settings
    runs/<run id>/             the point's run record (what `fedcore simulate --out` writes)
    runs/<run id>.log          its stdout and stderr
    runs/<run id>.done.json    written when the subprocess has exited: exit status and seconds
    runs/<run id>.audit/       with ``audit = true``, a record-level point's ``fedcore audit``
                               (``audit.json``), with its own ``.log`` and ``.done.json``

A point is finished when its ``.done.json`` exists, whatever its outcome (a run stopped early by
its budget is a result, not a failure to retry). A rerun skips finished points; a point that was
interrupted (run folder, no ``.done.json``) loses its partial record and runs again from the start,
since ``fedcore simulate`` never continues a run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedcore.errors import ConfigError
from fedcore.experiment.plan import Point
from fedcore.experiment.spec import ExperimentSpec

POLL_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class RunOutcome:
    run_id: str
    returncode: int
    seconds: float


AUDIT = ".audit"  # the suffix of a point's audit folder, log and done file


def run_dir(out: Path, run_id: str, suffix: str = "") -> Path:
    return out / "runs" / f"{run_id}{suffix}"


def done_path(out: Path, run_id: str, suffix: str = "") -> Path:
    return out / "runs" / f"{run_id}{suffix}.done.json"


def read_outcome(out: Path, run_id: str, suffix: str = "") -> RunOutcome | None:
    """The recorded outcome of a finished point (or its audit), or None if it has not finished."""
    try:
        doc = json.loads(done_path(out, run_id, suffix).read_text())
        return RunOutcome(run_id, int(doc["returncode"]), float(doc["seconds"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare(out: Path, *, spec_text: str, spec: ExperimentSpec, points: Sequence[Point]) -> None:
    """Create the folder, or check that it holds this same experiment. Raises ConfigError."""
    spec_file = out / "spec.toml"
    plan_file = out / "plan.json"
    plan_doc = {
        "name": spec.name,
        "quick": spec.quick,
        "points": {
            p.run_id: {"swept": {k: _jsonable(v) for k, v in p.swept.items()}, "settings": dict(p.settings)}
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
    spec_file.write_text(spec_text)
    plan_file.write_text(json.dumps(plan_doc, indent=2) + "\n")


def _jsonable(value: object) -> object:
    from fedcore.experiment.plan import display

    return value if value is None or isinstance(value, bool | int | float) else display(value)


def simulate_command(point: Point, *, out: Path) -> list[str]:
    command = [sys.executable, "-m", "fedcore.cli", "simulate", "--out", str(run_dir(out, point.run_id))]
    for item in point.overrides():
        command += ["--set", item]
    return command


def audit_command(point: Point, *, out: Path, canaries: int | None) -> list[str]:
    command = [sys.executable, "-m", "fedcore.cli", "audit", "--out", str(run_dir(out, point.run_id, AUDIT))]
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


def run_points(
    points: Sequence[Point],
    *,
    out: Path,
    jobs: int,
    suffix: str = "",
    command: Callable[[Point, Path], list[str]] = lambda point, out: simulate_command(point, out=out),
    on_start: Callable[[Point], None] = lambda p: None,
    on_poll: Callable[[Point], None] = lambda p: None,
    on_done: Callable[[Point, RunOutcome], None] = lambda p, o: None,
) -> list[RunOutcome]:
    """Run every unfinished point, ``jobs`` at a time; returns the outcomes of those it ran.

    Finished points are skipped without calling anything. ``command`` gives the subprocess of a
    point (default :func:`simulate_command`; tests put a stand-in there); ``suffix`` names what
    it writes (``""`` for the run, :data:`AUDIT` for the audit). ``on_poll`` is called for each running
    point about twice a second (for a progress display).
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    todo = [p for p in points if read_outcome(out, p.run_id, suffix) is None]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0")}
    running: list[_Running] = []
    outcomes: list[RunOutcome] = []
    try:
        while todo or running:
            while todo and len(running) < jobs:
                point = todo.pop(0)
                target = run_dir(out, point.run_id, suffix)
                if target.exists():  # interrupted before: its partial record cannot be continued
                    shutil.rmtree(target)
                with open(target.with_name(target.name + ".log"), "wb") as log:
                    process = subprocess.Popen(
                        command(point, out), stdout=log, stderr=subprocess.STDOUT, env=env
                    )
                running.append(_Running(point, process, time.monotonic()))
                on_start(point)
            time.sleep(POLL_SECONDS)
            for item in list(running):
                on_poll(item.point)
                if item.process.poll() is None:
                    continue
                running.remove(item)
                outcome = RunOutcome(
                    item.point.run_id, int(item.process.returncode), time.monotonic() - item.started
                )
                done = done_path(out, outcome.run_id, suffix)
                tmp = done.with_suffix(".tmp")
                tmp.write_text(json.dumps({"returncode": outcome.returncode, "seconds": round(outcome.seconds, 2)}))
                tmp.replace(done)
                outcomes.append(outcome)
                on_done(item.point, outcome)
    finally:
        for item in running:  # interrupted: stop what this call started
            item.process.terminate()
        for item in running:
            try:
                item.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                item.process.kill()
    return outcomes
