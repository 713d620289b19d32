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
How a run ends (these statuses, and closing a record that nobody closed) is
:mod:`fedcore.lifecycle`, shared with ``fedcore deploy-local``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedcore import config as cfg
from fedcore.cli import add_resume_argument, add_settings_arguments, counted, resolve_run
from fedcore.cli.preflight import cpu_warning
from fedcore.deploy.processes import Stopped, signals_stop
from fedcore.lifecycle import close_crashed, interrupted, report, rounds_text, run_status

if TYPE_CHECKING:
    from fedcore.deploy.processes import ManagedProcess, ProcessSupervisor


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "simulate",
        help="run a federation on Flower's simulation engine",
        description="Run a simulated federation (Flower simulation engine) and write its run record.",
        epilog="Without arguments: the main job, digits over 10 sites. --help-settings lists every "
        "key. The seed fixes the data, the partition and the initial model; DP noise is drawn "
        "from a CSPRNG: runs differ at a fixed seed.",
    )
    add_settings_arguments(parser, verbose_help="show Flower's and Ray's logs")
    add_resume_argument(parser)
    parser.add_argument(
        "--help-settings", action="store_true", help="list every setting with its default and exit"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    if args.help_settings:
        print(cfg.describe())
        return 0
    # Before flwr / flwr_datasets are imported (a --resume reads the record with the server's
    # code): both send telemetry unless told not to.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    settings, out_dir = resolve_run(args)
    return simulate(settings, out_dir, verbose=args.verbose)


def simulate(settings: cfg.Settings, out_dir: Path, *, verbose: bool = False) -> int:
    """The work of ``fedcore simulate``: check ``settings`` (a resumed record's, with ``resume``
    set, or a new run's), run the federation into ``out_dir``, close the record; the exit status
    (the module's). ``verbose``: Flower's and Ray's logs. Raises :class:`ConfigError` for a run
    refused before it starts (no record left); a signal once the run has started is an exit
    status (130, 143), Ctrl-C during the checks ``KeyboardInterrupt``."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if (warning := cpu_warning(settings, cores=os.cpu_count() or 1)) is not None:
        print(warning, file=sys.stderr)
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
            supervisor, settings, out_dir=out_dir, verbose=verbose, handshake=handshake
        )
        from fedcore.cli import preflight as checks

        checks.check_run(settings, out_dir)
        what = "resuming" if settings.resume else "run record:"
        print(
            f"fedcore: {counted(settings.sites, 'site')}, {rounds_text(settings.rounds)}, dataset {settings.dataset!r}, "
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
