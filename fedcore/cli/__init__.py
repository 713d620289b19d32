"""The ``fedcore`` command line.

Each subcommand is a module of this package with two functions::

    def add_parser(subparsers) -> argparse.ArgumentParser   # declares the subcommand's options
    def run(args: argparse.Namespace) -> int                 # does the work, returns the exit code

A :class:`~fedcore.errors.FedcoreError` escaping ``run`` is printed as one line on stderr and the
command exits with status 2 (bad input), never with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence

from fedcore.errors import FedcoreError

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


def add_settings_arguments(parser: argparse.ArgumentParser, *, verbose_help: str) -> None:
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
        help="override one setting (repeatable; `fedcore simulate --help-settings` lists them)",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="run record directory (default: runs/<timestamp>)"
    )
    parser.add_argument("--verbose", action="store_true", help=verbose_help)


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
