"""``fedcore deploy-local``: the deployment engine on this machine, TLS and node auth on.

    fedcore deploy-local --sites N [--rounds R] [--config FILE.toml] [--set key=value ...]
                         [--out DIR]
    fedcore deploy-local --sites N --resume DIR [--rounds R] [--set key=value ...]

Starts a SuperLink and N SuperNodes on 127.0.0.1 (fresh certificates and site keys, free ports,
a private FLWR_HOME), registers the sites, runs the fedcore app with ``flwr run . CONNECTION
--stream``, shows each round, writes the run record into ``DIR`` (default ``runs/<timestamp>``)
and stops every process it started, by process id, also on Ctrl-C, SIGTERM or a failed run.

On the first Ctrl-C or SIGTERM every process is stopped and the record closed as of the last
completed round ("interrupted after round R", that round's ``model.pt``); ``--resume DIR``
continues it (the ServerApp reads the ``resume`` setting, which ``flwr run --run-config`` can set
too).

With site-level DP (``dp.server.epsilon``, or ``dp.distributed.epsilon`` with secure aggregation)
and no ``dp.server.state_dir``, the federation ledger goes to ``DIR/federation`` (the sites keep
theirs in ``DIR/sites``), so a ``--resume DIR`` finds it again; the console names the folder.

Exit status: 0 when every round ran (or a privacy budget was spent); 1 when the run failed; 2 for
bad input or a step that failed before the run; 130 on Ctrl-C, 143 on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedcore.cli import add_resume_argument, add_settings_arguments, counted, resolve_run
from fedcore.errors import ConfigError

if TYPE_CHECKING:
    from fedcore.config import Settings


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "deploy-local",
        help="run the app on Flower's deployment engine on 127.0.0.1 (TLS, node authentication)",
        description=(
            "Start a SuperLink and N SuperNodes on 127.0.0.1 with TLS and node authentication, "
            "run the fedcore app on them with flwr run, write the run record, stop everything."
        ),
    )
    parser.add_argument(
        "--sites", type=int, required=True, metavar="N", help="number of SuperNodes (sites)"
    )
    parser.add_argument(
        "--rounds", type=int, metavar="R", help="federated rounds (the setting 'rounds')"
    )
    add_settings_arguments(parser, verbose_help="show Flower's INFO logs of the run")
    add_resume_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if args.sites < 1:
        raise ConfigError(f"--sites must be >= 1, got {args.sites}")
    overrides = [*args.overrides, f"sites={args.sites}"]
    if args.rounds is not None:
        overrides.append(f"rounds={args.rounds}")
    settings, out_dir = resolve_run(argparse.Namespace(**{**vars(args), "overrides": overrides}))
    return deploy_local(settings, out_dir, verbose=args.verbose)


def deploy_local(settings: Settings, out_dir: Path, *, verbose: bool = False) -> int:
    """The work of ``fedcore deploy-local``: check ``settings`` (a resumed record's, with
    ``resume`` set, or a new run's, ``settings.sites`` SuperNodes), run them on the deployment
    engine into ``out_dir`` with :func:`deployed_settings`, stop every process, close the record;
    the exit status (the module's). ``verbose``: Flower's INFO logs. Raises :class:`ConfigError`
    for a run refused before any process starts."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from fedcore.cli import preflight as checks
    from fedcore.deploy.local import deploy_local as deploy
    from fedcore.deploy.processes import Stopped, signals_deferred, signals_stop
    from fedcore.lifecycle import EXIT_FAILED, close_crashed, interrupted, report, run_status

    out_dir = out_dir.expanduser().resolve()
    settings = deployed_settings(settings, out_dir)
    checks.check_run(settings, out_dir)  # bad settings fail here, before any process starts
    _announce(settings, out_dir)
    start = time.monotonic()
    try:
        with signals_stop():
            outcome = deploy(settings, out_dir=out_dir, echo=_echo, verbose=verbose)
    except Stopped as stop:  # deploy_local has stopped every process on the way out
        with signals_deferred():
            resume_with = f"fedcore deploy-local --sites {settings.sites}"
            return interrupted(
                out_dir, stop.signum, resumed=settings.resume, resume_with=resume_with
            )
    _echo(
        f"deploy: every process stopped; {time.monotonic() - start:.0f} s in all, "
        f"the run {outcome.seconds:.0f} s"
    )
    if run_status(out_dir) is None:  # the ServerApp died without closing the record
        close_crashed(out_dir, returncode=outcome.returncode, resumed=settings.resume)
    if not (out_dir / "history.jsonl").exists():
        _echo(f"fedcore: the run wrote no run record (flwr run exited with {outcome.returncode})")
        return EXIT_FAILED
    return report(out_dir, settings, returncode=outcome.returncode)


def _echo(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _announce(settings: Settings, out_dir: Path) -> None:
    from fedcore.lifecycle import rounds_text
    from fedcore.protections import protections_of

    _echo(
        f"fedcore: deployment engine on 127.0.0.1, {counted(settings.sites, 'site')}, "
        f"{rounds_text(settings.rounds)}, "
        f"dataset {settings.dataset!r}; run record: {out_dir}"
    )
    mechanism = protections_of(settings).mechanism
    if mechanism is not None:
        inside = Path(mechanism.state_dir).is_relative_to(out_dir)
        where = " (inside the run record)" if inside else ""
        _echo(f"fedcore: federation ledger in dp.server.state_dir {mechanism.state_dir}{where}")


# dp.server.state_dir of a deployed run with site-level DP that names none: inside its record.
STATE_FOLDER = "federation"


def deployed_settings(settings: Settings, out_dir: Path) -> Settings:
    """The settings a deployment of ``settings`` into ``out_dir`` (absolute) runs with.

    A deployed run with site-level DP (DP-FedAvg or distributed DP) keeps the federation ledger in
    ``dp.server.state_dir``: the ServerApp refuses it otherwise, after every process has started.
    deploy-local owns its record folder, and its sites keep their state there too
    (``OUT/sites``), so a new run without the setting gets ``OUT/federation``; the record's
    ``config.json`` names it, so a ``--resume`` of the record finds it again. A resumed record
    keeps its settings: one made without the setting (a simulation's) is refused here, before any
    process starts. Raises :class:`ConfigError`."""
    from fedcore import config as cfg
    from fedcore.protections import protections_of

    mechanism = protections_of(settings).mechanism
    if mechanism is None or mechanism.persistent:
        return settings
    if settings.resume:
        raise ConfigError(
            "a deployed run with site-level DP needs 'dp.server.state_dir' (a folder kept across "
            f"runs for the federation ledger), and the record {str(out_dir)!r} was made without "
            "one, which a resume cannot change: continue it with fedcore simulate --resume"
        )
    state_dir = str(out_dir / STATE_FOLDER)
    return cfg.resolve(values={**settings.to_dict(), "dp.server.state_dir": state_dir})
