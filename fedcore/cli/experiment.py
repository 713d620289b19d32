"""``fedcore experiment``: sweep privacy modes, budgets, seeds and settings from one TOML spec.

    fedcore experiment SPEC.toml [--out DIR] [--jobs N] [--quick]

Every point of the spec (:mod:`fedcore.experiment.spec`) is one ``fedcore simulate`` run in a
subprocess, ``N`` at a time. The folder (default ``runs/experiment-<name>``, ``-quick`` with
``--quick``) gets ``spec.toml``, ``results.csv``, ``summary.md``, the plots and one run record per
point under ``runs/``; with ``audit = true`` in ``[axes]``, a ``fedcore audit`` of every
record-level point beside its run. Each point's console output (per-round losses and site counts,
which the privacy guarantees do not cover) goes to ``logs/``, readable by the owner only.
Rerunning the same command skips the points already finished; a point that a signal stopped
(exit 130, 143, or killed) is no result and runs again, and the console says so before it starts
(:mod:`fedcore.experiment.runner`). A ``client_cpus`` above the machine's cores is warned about
once, on the console, before anything runs. Where any point has DP, the console and
``summary.md`` say that DP noise is drawn from a CSPRNG, so runs differ at a fixed seed. Exit
status: 0 when every run completed every round, 1 otherwise, 2 for a bad spec (before anything
runs).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcore.cli import counted, description_of
from fedcore.errors import ConfigError

if TYPE_CHECKING:
    from fedcore.experiment import ExperimentSpec, Point
    from fedcore.experiment.runner import PointOutcome


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "experiment",
        help="run a privacy-budget experiment from a TOML spec",
        description=description_of(__doc__),
    )
    parser.add_argument("spec", metavar="SPEC.toml", help="the experiment spec")
    parser.add_argument(
        "--out", metavar="DIR", help="experiment folder (default: runs/experiment-<name>)"
    )
    parser.add_argument(
        "--jobs", metavar="N", default="1", help="runs at a time (default 1; at most the CPU count)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="apply the spec's [quick] table (a short version)"
    )
    return parser


def _jobs(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--jobs must be an integer, got {text!r}") from None


def usable_jobs(jobs: int) -> int:
    """``jobs`` runs at a time, at most the CPU count (said on the console when it is cut).
    Raises :class:`ConfigError` for a number that is not a whole one, or below 1."""
    if isinstance(jobs, bool) or not isinstance(jobs, int):
        raise ConfigError(f"--jobs must be an integer, got {jobs!r}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    cores = os.cpu_count() or 1
    if jobs > cores:
        print(
            f"fedcore experiment: --jobs {jobs} is more than the {cores} CPUs; using {cores}",
            file=sys.stderr,
        )
        return cores
    return jobs


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def default_folder(spec: ExperimentSpec, *, quick: bool) -> Path:
    """An experiment's folder without ``--out``: ``runs/experiment-<name>`` (``-quick``)."""
    return Path("runs") / (f"experiment-{spec.name}" + ("-quick" if quick else ""))


def run(args: argparse.Namespace) -> int:
    jobs = _jobs(args.jobs)
    out = Path(args.out) if args.out else None
    return experiment(Path(args.spec), out=out, jobs=jobs, quick=args.quick)


def experiment(
    spec_path: Path, *, out: Path | None = None, jobs: int = 1, quick: bool = False
) -> int:
    """The work of ``fedcore experiment``: every unfinished point of the spec at ``spec_path``
    (with its ``[quick]`` table if ``quick``), ``jobs`` at a time, into ``out`` (default
    :func:`default_folder`), then the tables, plots and summary; the exit status (the module's).
    While it runs, SIGTERM raises ``KeyboardInterrupt`` as Ctrl-C does (the handler before is put
    back after). Raises :class:`ConfigError` for a bad spec, before anything runs."""
    saved = signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's TERM stops the runs too
    try:
        return _experiment(spec_path, out=out, jobs=usable_jobs(jobs), quick=quick)
    finally:
        signal.signal(signal.SIGTERM, saved)


def _experiment(spec_path: Path, *, out: Path | None, jobs: int, quick: bool) -> int:
    from fedcore.experiment import Mode, load_spec, plan
    from fedcore.experiment.plots import write_plots
    from fedcore.experiment.results import CSPRNG_NOTE, collect, write_csv
    from fedcore.experiment.runner import prepare
    from fedcore.experiment.summary import write_summary

    spec = load_spec(spec_path, quick=quick)
    points = plan(spec)
    out = out or default_folder(spec, quick=quick)
    prepare(out, spec_text=spec_path.read_text(), spec=spec, points=points)
    audited = [p for p in points if p.mode is Mode.RECORD] if spec.audit else []
    for warning in cpu_warnings(points, cores=os.cpu_count() or 1):
        print(warning, file=sys.stderr)
    _run_with_progress(spec, points, audited, out=out, jobs=jobs)

    results = collect(points, out=out)
    write_csv(results, spec, out / "results.csv")
    plots = write_plots(results, spec, out)
    write_summary(results, spec, out / "summary.md", plots=plots)
    complete = sum(
        1 for r in results if r.returncode == 0 and r.rounds_completed == r.rounds_planned
    )
    print(f"{complete} of {counted(len(results), 'run')} completed every round")
    if any(p.has_dp for p in points):
        print(CSPRNG_NOTE)
    print(f"results: {out / 'results.csv'}\nsummary: {out / 'summary.md'}")
    return 0 if complete == len(results) else 1


def cpu_warnings(points: list[Point], *, cores: int) -> list[str]:
    """The ``client_cpus`` warnings of :func:`fedcore.cli.preflight.cpu_warning`, once per
    distinct one: a point's own warning goes to its log, which nobody reads as it runs."""
    from fedcore import config as cfg
    from fedcore.cli.preflight import cpu_warning

    found: list[str] = []
    for point in points:
        warning = cpu_warning(cfg.resolve(values=point.settings), cores=cores)
        if warning is not None and warning not in found:
            found.append(warning)
    return found


def _run_with_progress(
    spec: ExperimentSpec, points: list[Point], audited: list[Point], *, out: Path, jobs: int
) -> None:
    """Run the unfinished points, then the unfinished audits, with a progress bar over both."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedcore.experiment.runner import (
        AUDIT,
        audit_command,
        exit_text,
        is_finished,
        run_points,
        stopped_points,
    )

    done_before = sum(1 for p in points if is_finished(out, p.run_id))
    done_before += sum(1 for p in audited if is_finished(out, p.run_id, AUDIT))
    console = Console(stderr=True)
    console.print(
        f"fedcore experiment {spec.name!r}: {counted(len(points), 'run')}"
        + (f" and {counted(len(audited), 'audit')}" if audited else "")
        + f" ({done_before} already finished), "
        f"{jobs} at a time; folder {out}"
    )
    for what, group, suffix in (("point", points, ""), ("the audit of point", audited, AUDIT)):
        for point, outcome in stopped_points(group, out=out, suffix=suffix):
            console.print(
                f"{what} {point.run_id} was stopped by a signal "
                f"({exit_text(outcome.returncode)}): running it again"
            )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        overall = progress.add_task("runs", total=len(points) + len(audited), completed=done_before)

        def on_done(point: Point, outcome: PointOutcome) -> None:
            progress.advance(overall)
            note = "" if outcome.returncode == 0 else f" ({exit_text(outcome.returncode)})"
            if not outcome.finished:
                note += ": stopped by a signal; a rerun runs it again"
            progress.console.print(f"  {point.run_id}: {outcome.seconds:.0f} s{note}")

        run_points(points, out=out, jobs=jobs, on_done=on_done)
        if audited:
            canaries = spec.audit_canaries
            run_points(
                audited,
                out=out,
                jobs=jobs,
                suffix=AUDIT,
                command=lambda p, o: audit_command(p, out=o, canaries=canaries),
                on_done=on_done,
            )
