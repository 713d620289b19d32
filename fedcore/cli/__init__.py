"""The ``fedcore`` command line.

Each subcommand is a module of this package with two functions::

    def add_parser(subparsers) -> argparse.ArgumentParser   # declares the subcommand's options
    def run(args: argparse.Namespace) -> int                 # reads the options, returns the exit code

A command that runs something (``simulate``, ``deploy-local``, ``experiment``) keeps its work in a
function of typed arguments beside ``run`` (:func:`fedcore.cli.simulate.simulate`,
:func:`fedcore.cli.deploy_local.deploy_local`, :func:`fedcore.cli.experiment.experiment`): ``run``
turns the options into a :class:`~fedcore.config.Settings`, paths and flags and calls it, and so
does the Python API (:mod:`fedcore.api.runs`), which never sees an option name.

A :class:`~fedcore.errors.FedcoreError` escaping ``run`` is printed as one line on stderr and the
command exits with status 2 (bad input), never with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedcore.errors import ConfigError, FedcoreError

if TYPE_CHECKING:
    from fedcore.config import Settings

# Subcommand name -> module under fedcore.cli. Modules are imported lazily so that `fedcore budget`
# does not pay for importing Flower and Ray.
SUBCOMMANDS: dict[str, str] = {
    "simulate": "fedcore.cli.simulate",
    "budget": "fedcore.cli.budget",
    "certs": "fedcore.cli.certs",
    "deploy-local": "fedcore.cli.deploy_local",
    "ledger": "fedcore.cli.ledger",
    "experiment": "fedcore.cli.experiment",
    "audit": "fedcore.cli.audit",
}

EXIT_BAD_INPUT = 2


def add_settings_arguments(
    parser: argparse.ArgumentParser,
    *,
    verbose_help: str,
    out_help: str = "run record directory (default: runs/<timestamp>)",
) -> None:
    """``--config``, ``--set``, ``--out`` and ``--verbose``: how every federation command takes settings."""
    parser.add_argument(
        "--config", metavar="FILE.toml", help="settings file (keys as in --set; tables allowed)"
    )
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override one setting (repeatable; fedcore simulate --help-settings lists them)",
    )
    parser.add_argument("--out", metavar="DIR", help=out_help)
    parser.add_argument("--verbose", action="store_true", help=verbose_help)


def add_resume_argument(parser: argparse.ArgumentParser) -> None:
    """``--resume DIR``: continue a run record (``fedcore simulate`` and ``deploy-local``)."""
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run record DIR from its last completed round, with its settings "
        "(--set may change only how it runs: rounds, round_timeout, client_cpus, ...)",
    )


def resolve_run(args: argparse.Namespace) -> tuple[Settings, Path]:
    """The settings and out folder of a new run, or of the record ``--resume`` names. Raises
    :class:`ConfigError` for a bad setting, or a record that cannot be continued."""
    from fedcore import config as cfg

    if args.resume is None:
        settings = cfg.resolve(file=args.config, overrides=args.overrides)
        return settings, out_dir_of(settings, args.out)
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
            f"{str(out_dir)!r} already ran {checkpoint.round} of {counted(settings.rounds, 'round')} "
            "(--set rounds=N continues it to round N)"
        )
    return settings, out_dir


def out_dir_of(settings: Settings, out: str | os.PathLike[str] | None) -> Path:
    """The folder of a new run's record: ``out`` (``--out``), else the ``out`` setting, else
    ``runs/<timestamp>``."""
    if out:
        return Path(out)
    if settings.out:
        return Path(settings.out)
    from fedcore.runrecord import default_out_dir  # imports torch: only when needed

    return default_out_dir()


def counted(n: int, noun: str) -> str:
    """``1 site``, ``3 sites``: a count with its noun in the number it takes."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def description_of(doc: str | None) -> str | None:
    """The first paragraph of a module docstring as plain text for ``--help``: reStructuredText
    markup (``literal``, :role:`target`, `title`) shown as the words it marks."""
    if not doc:
        return None
    text = doc.strip().split("\n\n")[0]
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "").replace("`", "")


def version_line() -> str:
    """``fedcore X.Y.Z`` and, in a git checkout, its commit."""
    from fedcore import __version__
    from fedcore.provenance import fedcore_commit

    commit = fedcore_commit()
    return f"fedcore {__version__}" + (f" (commit {commit})" if commit else "")


def _load(name: str):  # noqa: ANN202 - a module
    return importlib.import_module(SUBCOMMANDS[name])


def build_parser(names: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedcore", description="Privacy-preserving federated learning on Flower."
    )
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in names:
        _load(name).add_parser(sub)
    return parser


# Commands whose process, run as the program, ends with os._exit once its output is flushed:
# tearing down torch, Flower and datasets' modules at interpreter exit takes 1-2 s here, after the
# run is over and every file written (the main job's time, issue 13).
QUICK_EXIT = frozenset({"simulate"})


def main(argv: Sequence[str] | None = None) -> int:
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    # Build only the parser asked for, so a subcommand's imports are paid only when it runs.
    # Subcommands whose module is not there yet are left out of the help.
    chosen = (
        [argv[0]] if argv and argv[0] in SUBCOMMANDS else [n for n in SUBCOMMANDS if _importable(n)]
    )
    parser = build_parser(chosen)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        code = int(_load(args.command).run(args))
    except FedcoreError as exc:
        print(f"fedcore {args.command}: error: {exc}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"fedcore {args.command}: interrupted", file=sys.stderr)
        code = 130
    if as_program and args.command in QUICK_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _importable(name: str) -> bool:
    return importlib.util.find_spec(SUBCOMMANDS[name]) is not None


if __name__ == "__main__":
    raise SystemExit(main())
