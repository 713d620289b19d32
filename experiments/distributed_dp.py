"""Distributed DP against central Gaussian (issue 22, point 5): runs ``fedcore experiment`` on
``experiments/distributed_dp.toml`` and prints its results table (accuracy per point, mean and
95 % interval over seeds). Only imports fedcore.

    python experiments/distributed_dp.py [--quick] [--jobs N] [--out DIR]

The run records, ``results.csv``, ``summary.md`` and the plots (``accuracy_vs_epsilon.png``,
``dp.distributed.bits_vs_accuracy.png``, ``dp.distributed.mechanism_vs_accuracy.png``) are in the
output folder (default ``runs/experiment-distributed_dp[-quick]``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedcore.cli import main as fedcore_main
from fedcore.experiment import load_spec, plan
from fedcore.experiment.results import collect
from fedcore.experiment.summary import results_table

SPEC = Path(__file__).with_name("distributed_dp.toml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the spec's [quick] table")
    parser.add_argument("--jobs", default="2", help="runs at a time (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    args = parser.parse_args(argv)
    spec = load_spec(SPEC, quick=args.quick)
    out = args.out or Path("runs") / (
        "experiment-distributed_dp" + ("-quick" if args.quick else "")
    )
    command = ["experiment", str(SPEC), "--jobs", args.jobs, "--out", str(out)]
    code = fedcore_main([*command, *(["--quick"] if args.quick else [])])
    print("\n".join(results_table(collect(plan(spec), out=out), spec)))
    return code


if __name__ == "__main__":
    sys.exit(main())
