"""examples/: each script runs to exit 0 in smoke mode (FEDCORE_EXAMPLE_SMOKE=1), and what it
wrote is a real run record that fedcore.RunRecord reads (slow: each starts Flower's simulation)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fedcore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT = 600


def run_example(name: str, folder: Path) -> str:
    """Run ``examples/<name>`` in smoke mode with ``folder`` as its argument; its stdout. On a
    timeout the script is stopped by its pid: SIGTERM first (fedcore then stops the processes it
    started and closes the record), SIGKILL if it has not exited 30 s later."""
    env = {**os.environ, "FEDCORE_EXAMPLE_SMOKE": "1"}
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / name), str(folder)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    start = time.monotonic()
    try:
        out, err = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        pytest.fail(f"{name} ran past {TIMEOUT} s")
    assert process.returncode == 0, f"{name} exited {process.returncode}:\n{err[-3000:]}"
    print(f"{name}: {time.monotonic() - start:.1f} s")
    return out


def the_record(folder: Path, prefix: str) -> fedcore.RunRecord:
    (path,) = folder.glob(f"{prefix}-*")
    return fedcore.RunRecord(path)


@pytest.mark.slow
def test_own_model_and_data_with_record_level_dp(tmp_path, monkeypatch):
    out = run_example("own_model_record_dp.py", tmp_path)
    record = the_record(tmp_path, "own-model")
    assert record.status == "completed" and record.rounds_completed == 1
    settings = record.settings
    # the user's model, named by the script's file, and the user's .npz, by its absolute path
    assert settings.model == "own_model_record_dp:Net"
    assert settings.dataset == str((tmp_path / "clusters.npz").resolve())
    assert settings.dp.site.epsilon == 4.0 and 0 < record.record_epsilon <= 4.0
    assert record.privacy["site_budget"] == {"epsilon": 4.0, "delta": 1e-5}
    assert f"accuracy {record.final_accuracy:.3f}" in out and str(record.path) in out
    monkeypatch.syspath_prepend(str(EXAMPLES))  # where the sites found Net
    model = record.load_model()
    assert type(model).__name__ == "Net" and model.layers[-1].out_features == 4


@pytest.mark.slow
def test_secure_aggregation_with_dp_fedavg(tmp_path):
    out = run_example("secagg_dpfedavg.py", tmp_path)
    record = the_record(tmp_path, "secagg-dpfedavg")
    assert record.status == "completed" and record.settings.secagg.enabled
    privacy = record.privacy
    assert privacy["server_mechanism"] == "central-gaussian-on-secagg"
    assert privacy["server_budget"]["epsilon"] == 8.0 and 0 < record.server_epsilon <= 8.0
    assert record.record_epsilon is None
    # Under site-level DP the losses and site counts the guarantee does not cover stay out of
    # the public history (they are in operator.jsonl, which RunRecord does not read).
    assert all("train_loss" not in row and "sites_replied" not in row for row in record.history)
    assert "central-gaussian-on-secagg" in out


@pytest.mark.slow
def test_budget_sweep_with_its_plot(tmp_path):
    out = run_example("budget_sweep.py", tmp_path)
    plot = tmp_path / "budget_sweep.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    folder = tmp_path / "budget_sweep-smoke"
    assert (folder / "results.csv").is_file() and (folder / "summary.md").is_file()
    # the experiment's folder, read back through the API: one finished run per epsilon
    sweep = fedcore.run_experiment(tmp_path / "budget_sweep-smoke.toml", out=folder)
    assert sorted(r.point.swept["epsilon"] for r in sweep.results) == [1, 8]
    assert sweep.complete and all(r.finished for r in sweep.results)
    for result in sweep.results:
        record = sweep.run(result)
        assert (
            record.status == "completed"
            and 0 < record.record_epsilon <= result.point.swept["epsilon"]
        )
        assert f"accuracy {record.final_accuracy:.3f}" in out
