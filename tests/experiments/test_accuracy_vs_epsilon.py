"""experiments/accuracy_vs_epsilon.py end to end, on a tiny federation (three Flower simulations)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "accuracy_vs_epsilon.py"
BUDGETS = (1.0, 3.0)


@pytest.mark.slow
def test_quick_run_writes_table_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "experiment"
    command = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--epsilons"]
    done = subprocess.run(
        command + [f"{e:g}" for e in BUDGETS],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=SCRIPT.parents[1],
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Accuracy against epsilon" in done.stdout
    assert (out / "table.txt").read_text().count("eps-") == len(BUDGETS)
    plot = out / "accuracy_vs_epsilon.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    doc = json.loads((out / "results.json").read_text())
    runs = {run["label"]: run for run in doc["runs"]}
    assert set(runs) == {"no-dp", *(f"eps-{e:g}" for e in BUDGETS)}
    assert runs["no-dp"]["epsilon_spent"] is None
    assert 0.0 <= runs["no-dp"]["final_accuracy"] <= 1.0
    for eps in BUDGETS:
        run = runs[f"eps-{eps:g}"]
        assert run["epsilon_budget"] == eps
        assert 0.0 < run["epsilon_spent"] <= eps
        assert run["noise_multiplier"] > 0
        assert run["rounds_completed"] == run["rounds_planned"] == 3
        assert 0.0 <= run["final_accuracy"] <= 1.0
