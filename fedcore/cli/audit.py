"""``fedcore audit``: an empirical lower bound on the record-level epsilon of the configured DP-SGD.

    fedcore audit [--config FILE] [--set key=value ...] [--canaries M] [--out DIR]

A one-run audit (Steinke, Nasr and Jagielski, NeurIPS 2023) of one site's DP-SGD, with ``M``
white-box gradient canaries (default 30000), and the same audit with the noise off as a positive
control, plus weakened mechanisms that state the audit's power (:mod:`fedcore.audit.run`). Writes ``DIR/audit.json`` (default ``runs/audit-<timestamp>``)
and prints the formal epsilon, the lower bound and the control's. Exit status 0 when a weakened
control with a finite epsilon is refuted and the audited bound is not above the formal epsilon, 1 otherwise, 2 for bad settings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
from pathlib import Path
from typing import Any

from fedcore.errors import ConfigError

DEFAULT_OUT = "runs/audit-<timestamp>"  # what --help says; default_out makes it


def default_out(now: dt.datetime) -> Path:
    """The folder of an audit run without ``--out``: :data:`DEFAULT_OUT` at ``now``."""
    return Path("runs") / f"audit-{now:%Y%m%d-%H%M%S}"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from fedcore.cli import add_settings_arguments, description_of

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "audit",
        help="empirical lower bound on the record-level epsilon (one-run audit)",
        description=description_of(__doc__),
    )
    add_settings_arguments(
        parser,
        verbose_help="print what the audit is doing",
        out_help=f"folder for audit.json (default: {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--canaries", metavar="M", default=None, help="number of gradient canaries (default 30000)"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from fedcore import config as cfg
    from fedcore._files import PUBLIC_MODE, create_exclusive, json_bytes
    from fedcore.audit.run import DEFAULT_CANARIES, audit

    settings = cfg.resolve(file=args.config, overrides=args.overrides)
    try:
        canaries = DEFAULT_CANARIES if args.canaries is None else int(args.canaries)
    except ValueError:
        raise ConfigError(f"--canaries must be an integer, got {args.canaries!r}") from None
    out = Path(args.out) if args.out else default_out(dt.datetime.now())
    if (out / "audit.json").exists():
        raise ConfigError(f"{str(out)!r} already holds an audit.json")
    if args.verbose:
        print(
            f"fedcore audit: {canaries} canaries in site 0's DP-SGD, and weakened controls",
            file=sys.stderr,
        )
    report = audit(settings, canaries=canaries)
    out.mkdir(parents=True, exist_ok=True)
    if not create_exclusive(
        out / "audit.json", json_bytes(report.to_json()) + b"\n", mode=PUBLIC_MODE
    ):
        raise ConfigError(f"{str(out)!r} already holds an audit.json")
    print(
        f"epsilon formal {report.epsilon_formal:.3f} (delta {report.delta:g}); empirical lower bound "
        f"{report.epsilon_lower_bound:.3f} at {report.confidence:.0%} confidence "
        f"({report.correct} of {report.guesses} guesses right)"
    )
    for c in report.controls:
        true = f"{c.epsilon_true:.3g}" if math.isfinite(c.epsilon_true) else "infinite"
        refuted = " (refuted)" if c.refuted else ""
        print(
            f"  control {c.name}: true epsilon {true}, lower bound {c.epsilon_lower_bound:.3f}{refuted}"
        )
    print(report.verdict)
    print(f"audit: {out / 'audit.json'}")
    ok = report.strong_enough and report.epsilon_lower_bound <= report.epsilon_formal
    return 0 if ok else 1
