"""``fedcore simulate``: a federation on Flower's simulation engine.

    fedcore simulate [--config FILE.toml] [--set key=value ...] [--out DIR]
    fedcore simulate --resume DIR [--set key=value ...]

Settings are checked, and the data and model loaded once, before Ray starts
(:mod:`fedcore.cli.preflight`), so a bad setting fails in a second with one line, exit status 2 and
no run record. The run record goes into exactly ``DIR`` (default ``runs/<timestamp>``).

The federation runs in a child process in a session of its own
(:func:`fedcore.federation.simulation.engine.child_argv`), started before the checks so that its imports
overlap them (it waits for a go, and is killed if a check fails); when the ServerApp has closed
the record the child and Ray are killed at once rather than shut down (nothing in them needs it).
The first SIGINT (Ctrl-C) or SIGTERM stops it: the round in flight is abandoned, the child and
every process it started (Ray) are stopped by process id, and the record is closed as of the last
completed round (``model.pt``, plots, summary "interrupted after round R"). ``--resume DIR``
continues such a record from its checkpoint.

Exit status: 0 when the run completed, or stopped because a privacy budget is spent; 1 when it
failed; 2 when it was refused before starting; 130 on SIGINT, 143 on SIGTERM (129 on SIGHUP).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedcore import config as cfg
from fedcore.cli import add_settings_arguments
from fedcore.deploy.processes import Stopped, signals_stop
from fedcore.errors import ConfigError

if TYPE_CHECKING:
    from fedcore.deploy.processes import ManagedProcess, ProcessSupervisor

EXIT_COMPLETED, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2
# A signal ends fedcore with 128 + its number, as a shell reports a process killed by it.
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "simulate",
        help="run a federation on Flower's simulation engine",
        description="Run a simulated federation (Flower simulation engine) and write its run record.",
        epilog="Without arguments: the main job, digits over 10 sites. `--help-settings` lists every key.",
    )
    add_settings_arguments(parser, verbose_help="show Flower's and Ray's logs")
    add_resume_argument(parser)
    parser.add_argument(
        "--help-settings", action="store_true", help="list every setting with its default and exit"
    )
    return parser


def add_resume_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run record DIR from its last completed round, with its settings "
        "(--set may change only how it runs: rounds, round_timeout, client_cpus, ...)",
    )


def resolve_run(args: argparse.Namespace) -> tuple[cfg.Settings, Path]:
    """The settings and out folder of a new run, or of the record ``--resume`` names."""
    if args.resume is None:
        settings = cfg.resolve(file=args.config, overrides=args.overrides)
        out = args.out or settings.out
        if not out:
            from fedcore.runrecord import default_out_dir  # imports torch: only when needed

            out = default_out_dir()
        return settings, Path(out)
    if args.config is not None or args.out is not None:
        raise ConfigError(
            "--resume takes its settings and folder from DIR/config.json; "
            "give only --set for what may change (rounds, round_timeout, client_cpus, ...)"
        )
    from fedcore.federation.server.checkpoint import read_checkpoint
    from fedcore.federation.server.serve import resume_settings
    from fedcore.runrecord import check_not_in_use

    out_dir = Path(args.resume)
    check_not_in_use(out_dir)  # before anything reads or changes the record
    settings = resume_settings(out_dir, cfg.parse_overrides(args.overrides))
    checkpoint = read_checkpoint(out_dir)
    if checkpoint is None:
        raise ConfigError(f"{str(out_dir)!r} has no checkpoint: it stopped before its first round")
    if checkpoint.round >= settings.rounds:
        raise ConfigError(
            f"{str(out_dir)!r} already ran {checkpoint.round} of {settings.rounds} rounds "
            "(--set rounds=N continues it to round N)"
        )
    return settings, out_dir


def run(args: argparse.Namespace) -> int:
    if args.help_settings:
        print(cfg.describe())
        return 0
    # Before flwr / flwr_datasets are imported: both send telemetry unless told not to.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    settings, out_dir = resolve_run(args)
    from fedcore.data.federation import DATA_CACHE_ENV
    from fedcore.deploy.processes import ProcessSupervisor
    from fedcore.federation.simulation.engine import GO, HANDSHAKE_ENV

    remove_stale_handshakes()
    handshake = Path(tempfile.mkdtemp(prefix=f"{HANDSHAKE_PREFIX}{os.getpid()}-"))
    # Every process of the run (the child, Ray's daemons and workers) inherits the handshake
    # folder in its environment: the supervisor's last sweep finds any that left the tree.
    supervisor = ProcessSupervisor(grace=3.0, mark=(HANDSHAKE_ENV, str(handshake)))
    saved_cache = os.environ.get(DATA_CACHE_ENV)
    # The checks below load the data and deal the sites once; the child and Ray's workers read it.
    os.environ[DATA_CACHE_ENV] = str(handshake)
    try:
        # Started before the checks, so that its imports (seconds) overlap them; it runs nothing
        # before the go below, and is killed (finally) if a check fails.
        child = start_child(
            supervisor, settings, out_dir=out_dir, verbose=args.verbose, handshake=handshake
        )
        from fedcore.cli import preflight as checks

        checks.check_run(settings, out_dir)
        what = "resuming" if settings.resume else "run record:"
        print(
            f"fedcore: {settings.sites} sites, {settings.rounds} rounds, dataset {settings.dataset!r}, "
            f"model {settings.model!r}, strategy {settings.strategy!r}; {what} {out_dir}",
            file=sys.stderr,
        )
        (handshake / GO).touch()
        return supervise(supervisor, child, settings, out_dir=out_dir, handshake=handshake)
    finally:
        supervisor.stop_all()
        shutil.rmtree(handshake, ignore_errors=True)
        if saved_cache is None:
            os.environ.pop(DATA_CACHE_ENV, None)
        else:
            os.environ[DATA_CACHE_ENV] = saved_cache


HANDSHAKE_PREFIX = "fedcore-simulate-"  # + the pid of the fedcore process that owns the folder


def remove_stale_handshakes(root: Path | None = None) -> list[Path]:
    """Remove the handshake folders (and data-plan caches) of ``fedcore simulate`` processes that
    no longer run: a killed one (SIGKILL) cannot remove its own. Returns those removed."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{HANDSHAKE_PREFIX}*-*"):
        owner = folder.name.removeprefix(HANDSHAKE_PREFIX).split("-", 1)[0]
        if not owner.isdigit() or not folder.is_dir():
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        except PermissionError:
            pass  # another user's process: alive
    return removed


def start_child(
    supervisor: ProcessSupervisor,
    settings: cfg.Settings,
    *,
    out_dir: Path,
    verbose: bool,
    handshake: Path,
) -> ManagedProcess:
    """Start the simulation's child process; it waits for ``handshake/go`` before it runs."""
    from fedcore.federation.simulation.engine import child_argv, child_env

    return supervisor.start(
        "simulation",
        child_argv(settings, out_dir=out_dir, verbose=verbose),
        env=child_env(handshake=handshake),
        die_with_parent=True,
        # Nothing in the child needs a clean exit: its checkpoint, ledgers and journals are
        # written atomically, and this process closes the record. A SIGTERM would only
        # make Flower print the tracebacks of the Ray workers dying under it.
        stop_signal=signal.SIGKILL,
    )


def supervise(
    supervisor: ProcessSupervisor,
    child: ManagedProcess,
    settings: cfg.Settings,
    *,
    out_dir: Path,
    handshake: Path,
) -> int:
    """Wait for the child until it ends, says the run is finished (``handshake/done``: then it
    and Ray are stopped at once, not after seconds of Flower's and Ray's shutdown) or a signal
    stops it; exit status."""
    from fedcore.deploy.processes import signals_deferred
    from fedcore.federation.simulation.engine import DONE

    try:
        with signals_stop():
            while (returncode := child.popen.poll()) is None:
                if (handshake / DONE).exists():
                    returncode = 0
                    break
                time.sleep(0.05)
    except Stopped as stop:
        with signals_deferred():
            supervisor.stop_all()
            return interrupted(out_dir, stop.signum, resumed=settings.resume)
    finally:
        supervisor.stop_all()
    if run_status(out_dir) is None:  # the child died without closing the record
        close_crashed(out_dir, returncode=returncode, resumed=settings.resume)
    return report(out_dir, settings, returncode=returncode)


STARTING_FILES = {
    "config.json",
    "history.jsonl",
    "summary.md",
    "accuracy.png",
    "status.json",
    ".writer.lock",
}


def remove_if_nothing_ran(out_dir: Path, *, resumed: bool) -> None:
    """Remove a record that holds only the files a run starts with: nothing ran, so no partial
    record is kept. Never a site's key or ledger (none exists before round 1, and round 1 comes
    after the first checkpoint), never a resumed record."""
    if not resumed and out_dir.is_dir() and {p.name for p in out_dir.iterdir()} <= STARTING_FILES:
        import shutil

        shutil.rmtree(out_dir, ignore_errors=True)


def close_crashed(out_dir: Path, *, returncode: int, resumed: bool) -> None:
    """The simulation process ended without closing the record: close it as failed as of its
    last checkpoint, or remove it if no round ran."""
    from fedcore.federation.server.serve import close_interrupted

    reason = f"the simulation process exited with status {returncode} (see the output above)"
    if close_interrupted(out_dir, reason=reason, status="failed") is None:
        remove_if_nothing_ran(out_dir, resumed=resumed)


def interrupted(out_dir: Path, signum: int, *, resumed: bool) -> int:
    """Close the record of a run stopped by ``signum``; the exit status for it."""
    from fedcore.federation.server.serve import close_interrupted

    name = signal.Signals(signum).name
    rounds = close_interrupted(out_dir, reason=f"received {name}")
    if rounds is None:
        remove_if_nothing_ran(out_dir, resumed=resumed)
        print(
            f"fedcore: {name}: stopped before the first round; no run record kept", file=sys.stderr
        )
    else:
        print(
            f"fedcore: {name}: stopped; every process it started is stopped; the record is closed "
            f"after round {rounds}: {out_dir} (continue with `fedcore simulate --resume {out_dir}`)",
            file=sys.stderr,
        )
    return EXIT_SIGNAL.get(signal.Signals(signum), 128 + signum)


def run_status(out_dir: Path) -> dict | None:
    """``status.json`` of the record (None if the run wrote none)."""
    try:
        return json.loads((out_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None


def report(out_dir: Path, settings: cfg.Settings, *, returncode: int = 0) -> int:
    """Print how the run ended from its record; 0 completed (or budget spent), 1 failed, 143
    interrupted (its server was stopped from outside)."""
    status = run_status(out_dir)
    if status is None:
        print(
            f"fedcore: the run failed before its first round (exit status {returncode}); "
            "no run record kept",
            file=sys.stderr,
        )
        return EXIT_FAILED
    rows = [
        json.loads(line)
        for line in (out_dir / "history.jsonl").read_text().splitlines()
        if line.strip()
    ]
    accuracy = rows[-1]["eval_accuracy"] if rows else None
    shown = "n/a" if accuracy is None or not math.isfinite(accuracy) else f"{accuracy:.4f}"
    if status["status"] == "failed":
        print(
            f"fedcore: the run failed after {len(rows)} of {settings.rounds} rounds: "
            f"{status['reason']}; see {out_dir / 'summary.md'}"
        )
        return EXIT_FAILED
    if status["status"] == "interrupted":  # its server was stopped (`flwr stop` in a deployment)
        print(
            f"fedcore: the run was interrupted after {len(rows)} of {settings.rounds} rounds: "
            f"{status['reason']}; continue it with --resume {out_dir}"
        )
        return EXIT_SIGNAL[signal.SIGTERM]
    if status["status"] == "stopped":
        print(
            f"fedcore: the run stopped after {len(rows)} of {settings.rounds} rounds: {status['reason']}"
        )
    print(f"final accuracy {shown} on the held-out set after {len(rows)} rounds")
    print(f"run record: {out_dir}")
    return EXIT_COMPLETED
