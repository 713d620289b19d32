"""``fedcore budget``: epsilon of DP-SGD-style training, or the noise that meets a target epsilon.

    fedcore budget --sample-rate Q --noise-multiplier Z --steps T --delta D     # prints epsilon
    fedcore budget --sample-rate Q --target-epsilon E --steps T --delta D       # prints noise
    ... [--accountant pld|rdp] [--json]

The mechanism is ``T`` steps of the Poisson-subsampled Gaussian (see
:mod:`fedcore.privacy.accountant`). With ``--json`` one object is printed, with keys
``epsilon``, ``noise_multiplier`` and ``accountant``. Every bad or missing value raises
:class:`~fedcore.errors.ConfigError`, which the dispatcher prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from fedcore.cli import counted, description_of
from fedcore.errors import ConfigError
from fedcore.privacy.accountant import (
    DEFAULT_ACCOUNTANT,
    AccountantKind,
    calibrate_noise_multiplier,
    epsilon,
    parse_accountant,
)
from fedcore.privacy.events import PoissonSubsampledGaussian


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "budget",
        help="epsilon for a noise multiplier, or the noise multiplier for a target epsilon",
        description=description_of(__doc__),
        # The values are checked in run(), so argparse would show the required ones as optional.
        usage=(
            "fedcore budget --sample-rate Q --steps T --delta D\n"
            "                      (--noise-multiplier Z | --target-epsilon E)\n"
            "                      [--accountant pld|rdp] [--json]"
        ),
    )
    # Values are parsed in run(), so that a bad one is a ConfigError (one line, exit 2).
    parser.add_argument("--sample-rate", metavar="Q", help="Poisson sampling rate in (0, 1]")
    parser.add_argument("--steps", metavar="T", help="number of steps (integer >= 1)")
    parser.add_argument("--delta", metavar="D", help="target delta in (0, 1)")
    parser.add_argument("--noise-multiplier", metavar="Z", help="noise std / clipping norm (> 0)")
    parser.add_argument("--target-epsilon", metavar="E", help="print the smallest noise for this")
    parser.add_argument(
        "--accountant",
        default=DEFAULT_ACCOUNTANT.value,
        metavar="|".join(k.value for k in AccountantKind),
        help=f"privacy accountant (default {DEFAULT_ACCOUNTANT.value})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _number(args: argparse.Namespace, name: str, *, integer: bool = False) -> float:
    raw = getattr(args, name.replace("-", "_"))
    if raw is None:
        raise ConfigError(f"--{name} is required")
    try:
        value = int(raw) if integer else float(raw)
    except (TypeError, ValueError):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"--{name} must be {kind}, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"--{name} must be finite, got {raw!r}")
    return value


def run(args: argparse.Namespace) -> int:
    accountant = parse_accountant(args.accountant)
    sample_rate = _number(args, "sample-rate")
    steps = int(_number(args, "steps", integer=True))
    delta = _number(args, "delta")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"--sample-rate must be in (0, 1], got {args.sample_rate!r}")
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps!r}")
    if not 0 < delta < 1:
        raise ConfigError(f"--delta must be in (0, 1), got {args.delta!r}")
    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise ConfigError("give exactly one of --noise-multiplier and --target-epsilon")

    if args.noise_multiplier is not None:
        noise = _number(args, "noise-multiplier")
        if noise <= 0:
            raise ConfigError(f"--noise-multiplier must be > 0, got {args.noise_multiplier!r}")
    else:
        target = _number(args, "target-epsilon")
        if target <= 0:
            raise ConfigError(f"--target-epsilon must be > 0, got {args.target_epsilon!r}")
        noise = calibrate_noise_multiplier(
            target_epsilon=target,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    event = PoissonSubsampledGaussian(
        sampling_rate=sample_rate, noise_multiplier=noise, count=steps
    )
    eps = epsilon(event, delta=delta, accountant=accountant)

    if args.json:
        print(
            json.dumps({"epsilon": eps, "noise_multiplier": noise, "accountant": accountant.value})
        )
    elif args.target_epsilon is not None:
        print(
            f"noise multiplier {noise:.6g}  (epsilon {eps:.6g} <= {args.target_epsilon} at delta "
            f"{delta:g}; sample rate {sample_rate:g}, {counted(steps, 'step')}, "
            f"{accountant.value} accountant)"
        )
    else:
        print(
            f"epsilon {eps:.6g}  (delta {delta:g}; noise multiplier {noise:g}, sample rate "
            f"{sample_rate:g}, {counted(steps, 'step')}, {accountant.value} accountant)"
        )
    return 0
