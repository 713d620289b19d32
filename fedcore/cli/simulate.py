"""``fedcore simulate``: a federation on Flower's simulation engine, in this process.

    fedcore simulate [--config FILE.toml] [--set key=value ...] [--out DIR]

Settings are checked, and the data and model loaded once, before Ray starts, so a bad setting
fails in a second with one line and exit status 2. The run record goes into exactly ``DIR``
(default ``runs/<timestamp>``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from fedcore import config as cfg
from fedcore.cli import add_settings_arguments
from fedcore.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "simulate",
        help="run a federation on Flower's simulation engine",
        description="Run a simulated federation (Flower simulation engine) and write its run record.",
        epilog="Without arguments: the main job, digits over 10 sites. `--help-settings` lists every key.",
    )
    add_settings_arguments(parser, verbose_help="show Flower's and Ray's logs")
    parser.add_argument(
        "--help-settings", action="store_true", help="list every setting with its default and exit"
    )
    return parser


def preflight(settings: cfg.Settings) -> tuple[tuple[int, ...], int]:
    """Load the data and build the model once, so bad input fails before Ray starts.

    Returns ``(input_shape, num_classes)``; raises :class:`ConfigError`.
    """
    from fedcore.data import load_holdout, load_site
    from fedcore.federation.dp_server import check_before_run
    from fedcore.federation.site_data import data_settings
    from fedcore.federation.site_privacy import check_site_round
    from fedcore.models import build_model

    data = data_settings(settings)
    _, input_shape, num_classes = load_holdout(data)
    for site_id in range(settings.sites):
        site = load_site(data, site_id)
        check_site_round(settings, num_examples=len(site.train.y), site_id=site_id)
    model = build_model(settings.model, input_shape=input_shape, num_classes=num_classes)
    check_before_run(settings, dim=sum(int(v.numel()) for v in model.state_dict().values()))
    return input_shape, num_classes


def run(args: argparse.Namespace) -> int:
    if args.help_settings:
        print(cfg.describe())
        return 0
    # Before flwr / flwr_datasets are imported: both send telemetry unless told not to.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    settings = cfg.resolve(file=args.config, overrides=args.overrides)
    from fedcore.runrecord import default_out_dir

    out_dir = Path(args.out or settings.out or default_out_dir())
    if (out_dir / "history.jsonl").exists():
        raise ConfigError(f"output directory {str(out_dir)!r} already holds a run record")
    preflight(settings)

    from fedcore.federation.simulation import simulate

    print(
        f"fedcore: {settings.sites} sites, {settings.rounds} rounds, dataset {settings.dataset!r}, "
        f"model {settings.model!r}, strategy {settings.strategy!r}; run record: {out_dir}",
        file=sys.stderr,
    )
    simulate(settings, out_dir=out_dir, verbose=args.verbose)
    return report(out_dir, settings)


def report(out_dir: Path, settings: cfg.Settings) -> int:
    """Print the final accuracy from the run record; exit 1 if the run did not complete."""
    rows = [
        json.loads(line)
        for line in (out_dir / "history.jsonl").read_text().splitlines()
        if line.strip()
    ]
    if len(rows) < settings.rounds or not (out_dir / "model.pt").exists():
        print(
            f"fedcore: the run stopped after {len(rows)} of {settings.rounds} rounds; see {out_dir / 'summary.md'}"
        )
        return 1
    accuracy = rows[-1]["eval_accuracy"]
    shown = "n/a" if accuracy is None or not math.isfinite(accuracy) else f"{accuracy:.4f}"
    print(f"final accuracy {shown} on the held-out set after {len(rows)} rounds")
    print(f"run record: {out_dir}")
    return 0
