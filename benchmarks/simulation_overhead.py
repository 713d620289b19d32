"""Steady-state round time of `fedcore simulate` against a bare Flower Message-API FedAvg app.

Both run on Flower's simulation engine with the same model (MLP), the same digits sites, the same
local loop and the same per-round work (federated train, federated evaluate, central evaluation);
the bare app is benchmarks/bare_flower_app (Flower's own `FedAvg.start`). Each run is a fresh
process. A round's time is the gap between successive round ends; round 1 (Ray start-up) is
excluded; the median of the rest is reported.

    python benchmarks/simulation_overhead.py [--sites 10 100] [--rounds 6]

Goal (issue 2): fedcore within 1.2x of bare Flower.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ENV, ROOT, bare_flower, learned, steady

DIGITS = 0.5  # the final accuracy a run on digits must pass to be timed


def fedcore_round(sites: int, rounds: int, tmp: Path) -> float:
    out = tmp / f"fedcore-{sites}"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fedcore.cli",
            "simulate",
            "--set",
            f"sites={sites}",
            "--set",
            f"rounds={rounds}",
            "--out",
            str(out),
        ],
        check=True,
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    learned(
        f"fedcore, {sites} sites",
        [r["eval_accuracy"] for r in rows],
        [r["sites_failed"] for r in rows],
        above=DIGITS,
    )
    return steady([r["ended_at"] for r in rows])


def bare_round(sites: int, rounds: int, tmp: Path) -> float:
    out = tmp / f"bare-{sites}.txt"
    config = {"sites": sites, "rounds": rounds, "local_epochs": 5, "batch_size": 16, "lr": 0.2,
              "out": str(out)}  # fmt: skip
    result = bare_flower(sites, config, out)
    learned(f"bare Flower, {sites} sites", result["accuracy"][1:], [0], above=DIGITS)
    return steady(result["ended_at"][1:])  # [0] is the initial evaluation, before round 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    print(f"{'sites':>6} {'fedcore s/round':>16} {'bare Flower s/round':>20} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for sites in args.sites:
            bare = bare_round(sites, args.rounds, Path(tmp))
            ours = fedcore_round(sites, args.rounds, Path(tmp))
            print(f"{sites:>6} {ours:>16.3f} {bare:>20.3f} {ours / bare:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
