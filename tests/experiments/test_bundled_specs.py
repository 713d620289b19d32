"""The specs in experiments/ plan as documented, and a tiny spec runs through real Flower runs."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from fedcore.experiment import Mode, load_spec, plan

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "experiments").glob("*.toml"))


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
@pytest.mark.parametrize("quick", [False, True])
def test_bundled_spec_plans(path: Path, quick: bool) -> None:
    points = plan(load_spec(path, quick=quick))
    assert points
    training = {"dataset", "sites", "rounds", "local_epochs", "batch_size", "lr"}
    first = {k: points[0].settings.get(k) for k in training}
    assert all({k: p.settings.get(k) for k in training} == first for p in points)  # fair


def test_mode_comparison_covers_every_mode_budget_and_seed() -> None:
    points = plan(load_spec(ROOT / "experiments" / "mode_comparison.toml"))
    modes = {p.mode for p in points}
    assert modes == {Mode.NONE, Mode.RECORD, Mode.SITE, Mode.SITE_SECAGG}
    assert len(points) == 3 + 3 * 4 * 3  # none x 3 seeds, 3 private modes x 4 budgets x 3 seeds
    quick = plan(load_spec(ROOT / "experiments" / "mode_comparison.toml", quick=True))
    assert len(quick) == 1 + 3 * 2


def test_distributed_dp_compares_central_with_both_mechanisms_by_bits_and_epsilon() -> None:
    path = ROOT / "experiments" / "distributed_dp.toml"
    points = plan(load_spec(path))
    central = [p for p in points if p.mode is Mode.SITE_SECAGG]
    distributed = [p for p in points if p.mode is Mode.DISTRIBUTED]
    assert len(central) == 4 * 3  # epsilons x seeds: the mechanism and bits axes do not apply
    assert len(distributed) == 4 * 2 * 5 * 3  # epsilons x mechanisms x bits x seeds
    assert {p.swept["dp.distributed.mechanism"] for p in distributed} == {"dgauss", "skellam"}
    assert {p.swept["dp.distributed.bits"] for p in distributed} == {12, 14, 16, 18, 20}
    for p in distributed:  # the papers' honest-sites assumption, under secure aggregation
        assert p.settings["secagg.enabled"] is True and "dp.server.epsilon" not in p.settings
        assert p.settings["dp.distributed.colluders"] == 0
    for p in central:
        assert p.settings["dp.server.epsilon"] == p.swept["epsilon"]
        assert "dp.distributed.epsilon" not in p.settings
    quick = plan(load_spec(path, quick=True))
    assert len(quick) == 2 * (1 + 2 * 2)  # seeds x (central + mechanisms x bits)
    script = (ROOT / "experiments" / "distributed_dp.py").read_text()
    assert "import fedcore" in script or "from fedcore" in script


TINY = """
[base]
dataset = "synthetic"
synthetic.samples = 300
sites = 2
rounds = 2
local_epochs = 1
batch_size = 64

[axes]
mode = ["record", "site"]
epsilon = [2, 8]
seed = [0, 1]
"""


@pytest.mark.slow
def test_tiny_experiment_through_fedcore_simulate(tmp_path: Path) -> None:
    """2 modes x 2 epsilons x 2 seeds, 2 rounds, 2 sites: eight real runs, then a rerun of none."""
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    out = tmp_path / "exp"
    command = [
        sys.executable,
        "-m",
        "fedcore.cli",
        "experiment",
        str(spec),
        "--out",
        str(out),
        "--jobs",
        "2",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 8
    for row in rows:
        assert row["status"] == "completed" and row["rounds_completed"] == "2"
        column = "record_epsilon" if row["mode"] == "record" else "server_epsilon"
        assert 0 < float(row[column]) <= float(row["epsilon"]) + 1e-6
        assert 0 <= float(row["final_accuracy"]) <= float(row["best_accuracy"]) <= 1
        assert (Path(row["run_dir"]) / "history.jsonl").exists()
    for name in ("spec.toml", "summary.md", "accuracy_vs_epsilon.png", "epsilon_per_round.png"):
        assert (out / name).stat().st_size > 0
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0
    assert "(8 already finished)" in again.stderr.replace("\n", " ")
    # each point's console output is the operator's: owner-only, in logs/ (issue 20, point 2)
    logs = sorted((out / "logs").glob("*.log"))
    assert [p.name for p in logs] == sorted(f"{r['run_id']}.log" for r in rows)
    assert all(p.stat().st_mode & 0o077 == 0 for p in logs)
