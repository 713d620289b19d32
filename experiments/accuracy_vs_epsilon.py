"""Accuracy against epsilon: record-level DP (DP-SGD at every site) at several budgets, and without DP.

    python experiments/accuracy_vs_epsilon.py [--epsilons 1 2 4 8] [--rounds R] [--sites N]
        [--set key=value ...] [--out DIR] [--quick]

Each point is one run of the default federation (digits over 10 sites, mlp, FedAvg) through
``fedcore simulate``, one subprocess at a time. The runs with DP set ``dp.site.epsilon`` and let
fedcore calibrate the noise multiplier from that budget over all rounds (delta 1e-5); the run
without DP is the reference line.

Training settings. DP-SGD's noise is calibrated to the *number of steps*, so the non-private
defaults (5 local epochs of batch 16, 20 rounds: 700 steps per site) would need a noise multiplier
of about 14 at epsilon 1. The DP runs therefore train 1 local epoch of batch 64 (2 steps per round
on a site's ~115 records) at lr 2.0 for 10 rounds: the same signal-to-noise for a given epsilon,
at a fraction of the steps, so a run takes about a minute. The reference run keeps fedcore's
non-private defaults (batch 16, lr 0.2, 5 local epochs), which an unclipped model needs; both use
``--rounds``. ``--set`` applies to every run and wins over these choices.

The experiment folder (default ``experiments/results/accuracy_vs_epsilon-<timestamp>``) gets
``results.json``, ``accuracy_vs_epsilon.png``, ``table.txt`` and one run record per point under
``runs/`` with its log.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from fedcore import config as cfg
from fedcore.errors import ConfigError

EXPERIMENT = "accuracy_vs_epsilon"
DEFAULT_EPSILONS = (1.0, 2.0, 4.0, 8.0)
DEFAULT_ROUNDS = 10
# Applied to the DP runs only (see the module docstring); --set overrides them.
DP_TRAINING = {"batch_size": "64", "lr": "2.0", "local_epochs": "1"}
# --quick: a tiny federation for tests, a few seconds of training per run.
QUICK = {"sites": 3, "rounds": 3}
QUICK_TRAINING = {"local_epochs": "1"}


@dataclass(frozen=True, slots=True)
class RunResult:
    """One point of the curve, read back from the run's record."""

    label: str
    epsilon_budget: float | None  # None: no DP
    epsilon_spent: float | None  # max over sites and rounds of the site's record-level epsilon
    noise_multiplier: float | None  # largest DP-SGD noise multiplier any site charged
    final_accuracy: float | None  # central (held-out) accuracy after the last completed round
    rounds_completed: int
    rounds_planned: int
    seconds: float
    status: str  # first line of the run's summary status, or why it failed
    run_dir: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Accuracy against epsilon for record-level DP on the default federation.",
    )
    parser.add_argument(
        "--epsilons",
        type=float,
        nargs="+",
        metavar="EPS",
        help=f"record-level budgets per site (default: {' '.join(f'{e:g}' for e in DEFAULT_EPSILONS)})",
    )
    parser.add_argument(
        "--rounds", type=int, help=f"federated rounds of every run (default {DEFAULT_ROUNDS})"
    )
    parser.add_argument("--sites", type=int, help="number of sites (default: fedcore's, 10)")
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="a fedcore setting for every run (as `fedcore simulate --set`); repeatable",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        help=f"experiment folder (default: experiments/results/{EXPERIMENT}-<timestamp>)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny configuration for tests: {QUICK['sites']} sites, {QUICK['rounds']} rounds, 1 local epoch",
    )
    args = parser.parse_args(argv)
    if args.epsilons is not None and not all(math.isfinite(e) and e > 0 for e in args.epsilons):
        parser.error(f"--epsilons must be finite and > 0, got {args.epsilons}")
    for name in ("rounds", "sites"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    return args


def plan_runs(args: argparse.Namespace) -> list[tuple[str, float | None, list[str]]]:
    """(label, budget, overrides) for each run: the reference first, then the budgets in order.

    Overrides are checked with :func:`fedcore.config.resolve`, so a bad setting fails here.
    """
    common: dict[str, str] = {}
    if args.quick:
        common.update({k: str(v) for k, v in QUICK.items()}, **QUICK_TRAINING)
    else:
        common["rounds"] = str(DEFAULT_ROUNDS)
    if args.rounds is not None:
        common["rounds"] = str(args.rounds)
    if args.sites is not None:
        common["sites"] = str(args.sites)
    user = list(args.overrides)

    def overrides(extra: dict[str, str]) -> list[str]:
        return [f"{k}={v}" for k, v in {**common, **extra}.items()] + user

    runs: list[tuple[str, float | None, list[str]]] = [("no-dp", None, overrides({}))]
    for eps in sorted(set(args.epsilons or DEFAULT_EPSILONS)):
        dp = {
            **DP_TRAINING,
            **(QUICK_TRAINING if args.quick else {}),
            "dp.site.epsilon": f"{eps:g}",
        }
        runs.append((f"eps-{eps:g}", eps, overrides(dp)))
    for _, _, run_overrides in runs:
        cfg.resolve(overrides=run_overrides)  # raises ConfigError naming the bad value
    return runs


def run_one(
    run_overrides: list[str],
    *,
    run_dir: Path,
    rounds: int,
    progress: Progress,
    task: int,
) -> tuple[int, float]:
    """Run ``fedcore simulate`` in a subprocess, advancing ``task`` as rounds finish.

    Returns (exit status, seconds). Its output goes to ``<run_dir>.log``.
    """
    command = [sys.executable, "-m", "fedcore.cli", "simulate", "--out", str(run_dir)]
    for item in run_overrides:
        command += ["--set", item]
    history = run_dir / "history.jsonl"
    started = time.monotonic()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0")}
    with open(run_dir.with_name(run_dir.name + ".log"), "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        while process.poll() is None:
            time.sleep(0.5)
            progress.update(task, completed=min(rounds, _count_rows(history)))
    progress.update(task, completed=rounds)
    return process.returncode, time.monotonic() - started


def _count_rows(history: Path) -> int:
    try:
        return sum(1 for line in history.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def read_result(
    label: str, budget: float | None, *, run_dir: Path, rounds: int, seconds: float, rc: int
) -> RunResult:
    """The point of one run, from ``history.jsonl``, ``privacy.json`` and ``summary.md``."""
    history = run_dir / "history.jsonl"
    rows = []
    if history.exists():
        rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    spent = [float(e) for row in rows for e in (row.get("site_epsilon") or {}).values()]
    noise = []
    privacy = run_dir / "privacy.json"
    if privacy.exists():
        doc = json.loads(privacy.read_text())
        for ledger in (doc.get("sites") or {}).values():
            for entry in ledger.get("entries", []):
                z = entry.get("event", {}).get("noise_multiplier")
                if z is not None:
                    noise.append(float(z))
    accuracy = rows[-1].get("eval_accuracy") if rows else None
    status = f"fedcore simulate exited {rc}"
    summary = run_dir / "summary.md"
    if summary.exists():
        for line in summary.read_text().splitlines():
            if line.startswith("- **Status**:"):
                status = line.split(":", 1)[1].strip()
                break
    return RunResult(
        label=label,
        epsilon_budget=budget,
        epsilon_spent=max(spent) if spent else None,
        noise_multiplier=max(noise) if noise else None,
        final_accuracy=accuracy,
        rounds_completed=len(rows),
        rounds_planned=rounds,
        seconds=round(seconds, 1),
        status=status,
        run_dir=str(run_dir),
    )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def results_table(results: list[RunResult]) -> Table:
    table = Table(title="Accuracy against epsilon (record-level DP, delta 1e-5 per site)")
    for name in ("run", "ε budget", "ε spent (max site)", "noise mult.", "accuracy", "rounds", "s"):
        table.add_column(name, justify="left" if name == "run" else "right")
    for r in results:
        table.add_row(
            r.label,
            _fmt(r.epsilon_budget, "g") if r.epsilon_budget is not None else "∞ (no DP)",
            _fmt(r.epsilon_spent, ".3f"),
            _fmt(r.noise_multiplier, ".3f"),
            _fmt(r.final_accuracy, ".4f"),
            f"{r.rounds_completed}/{r.rounds_planned}",
            f"{r.seconds:.0f}",
        )
    return table


def save_plot(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = [
        r
        for r in results
        if r.epsilon_budget is not None
        and r.epsilon_spent is not None
        and r.final_accuracy is not None
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    if dp:
        ax.plot(
            [r.epsilon_spent for r in dp],
            [r.final_accuracy for r in dp],
            "o-",
            label="DP-SGD at every site",
        )
        for r in dp:
            ax.annotate(
                f"budget {r.epsilon_budget:g}",
                (r.epsilon_spent, r.final_accuracy),
                textcoords="offset points",
                xytext=(4, -12),
                fontsize=8,
            )
        ax.set_xscale("log")
        ticks = sorted({r.epsilon_budget for r in dp if r.epsilon_budget is not None})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    for r in results:
        if r.epsilon_budget is None and r.final_accuracy is not None:
            ax.axhline(
                r.final_accuracy,
                color="gray",
                linestyle="--",
                label=f"no DP ({r.final_accuracy:.3f})",
            )
    ax.set_xlabel("epsilon spent (max over sites, delta 1e-5)")
    ax.set_ylabel("final central accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("Accuracy against record-level epsilon")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def default_out() -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(__file__).resolve().parent / "results" / f"{EXPERIMENT}-{stamp}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    try:
        runs = plan_runs(args)
    except ConfigError as exc:
        console.print(f"[red]accuracy_vs_epsilon: {exc}")
        return 2
    out: Path = args.out or default_out()
    if (out / "results.json").exists():
        console.print(f"[red]{out} already holds results; choose another --out")
        return 2
    (out / "runs").mkdir(parents=True, exist_ok=True)

    results: list[RunResult] = []
    started = time.monotonic()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        overall = progress.add_task("runs", total=len(runs))
        for label, budget, run_overrides in runs:
            rounds = cfg.resolve(overrides=run_overrides).rounds
            run_dir = out / "runs" / label
            task = progress.add_task(f"  {label} (rounds)", total=rounds)
            rc, seconds = run_one(
                run_overrides, run_dir=run_dir, rounds=rounds, progress=progress, task=task
            )
            result = read_result(
                label, budget, run_dir=run_dir, rounds=rounds, seconds=seconds, rc=rc
            )
            results.append(result)
            progress.remove_task(task)
            progress.advance(overall)
            progress.console.print(
                f"{label}: accuracy {_fmt(result.final_accuracy, '.4f')}, epsilon spent "
                f"{_fmt(result.epsilon_spent, '.3f')}, {result.rounds_completed}/{rounds} rounds, "
                f"{seconds:.0f} s ({result.status})"
            )

    table = results_table(results)
    console.print(table)
    with open(out / "table.txt", "w") as fh:
        Console(file=fh, width=120).print(table)
    save_plot(results, out / f"{EXPERIMENT}.png")
    doc = {
        "experiment": EXPERIMENT,
        "argv": sys.argv[1:] if argv is None else argv,
        "quick": args.quick,
        "dp_training": DP_TRAINING,
        "overrides": {label: o for label, _, o in runs},
        "seconds": round(time.monotonic() - started, 1),
        "runs": [asdict(r) for r in results],
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"results: {out / 'results.json'}\nplot: {out / f'{EXPERIMENT}.png'}")
    failed = [r.label for r in results if r.final_accuracy is None]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
