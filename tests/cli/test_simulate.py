"""`fedcore simulate`: bad settings fail in one line with exit 2; a real 2-site run end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def fedcore(*args, cwd=ROOT, timeout=600):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fedcore.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "dataset=mnist-on-the-moon"], "mnist-on-the-moon"),
        (["--set", "sites=5000"], "5000"),
        (["--set", "rounds=0"], "'rounds' must be >= 1, got 0"),
        (["--set", "colour=blue"], "unknown setting 'colour'"),
        (["--set", "model=transformer"], "unknown model 'transformer'"),
        (["--config", "/nonexistent/run.toml"], "does not exist"),
    ],
)
def test_bad_settings_give_one_line_and_exit_2(tmp_path, args, fragment):
    result = fedcore("simulate", *args, "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fedcore simulate: error:") and fragment in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_help_settings_lists_keys():
    result = fedcore("simulate", "--help-settings")
    assert (
        result.returncode == 0
        and "local_epochs" in result.stdout
        and "synthetic.samples" in result.stdout
    )


@pytest.mark.slow
def test_two_sites_two_rounds_end_to_end_through_flower_simulation(tmp_path):
    out = tmp_path / "run"
    result = fedcore("simulate", "--set", "sites=2", "--set", "rounds=2", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"run record: {out}" in result.stdout
    assert "final accuracy" in result.stdout

    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["sites"] == 2 and config["settings"]["rounds"] == 2
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    required = {
        "round",
        "sites_sampled",
        "sites_replied",
        "sites_failed",
        "train_loss",
        "eval_loss",
        "eval_accuracy",
        "seconds",
        "bytes_down",
        "bytes_up",
    }
    for row in rows:
        assert required <= row.keys()
        assert (row["sites_sampled"], row["sites_replied"], row["sites_failed"]) == (2, 2, 0)
        assert row["bytes_down"] > 0 and row["bytes_up"] > 0
    # The sites trained on the run's settings (2 sites), not on defaults: every training example of
    # the 2-site partition was used in each round.
    from fedcore.data import DataSettings, load_federation

    expected = sum(len(site.train.y) for site in load_federation(DataSettings(sites=2)).sites)
    assert [r["num_examples"] for r in rows] == [expected, expected]
    summary = (out / "summary.md").read_text()
    initial = float(summary.split("**Central accuracy**: ")[1].split(" initially")[0])
    assert rows[-1]["eval_accuracy"] > initial
    assert math.isfinite(rows[-1]["eval_loss"])
    import torch

    state = torch.load(out / "model.pt")
    assert set(state) and all(torch.isfinite(v).all() for v in state.values())
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True], ids=["semi-honest", "active+server-dp"])
def test_secure_aggregation_and_record_level_dp_through_flower_simulation(tmp_path, stacked):
    """Through real Ray workers: secure aggregation with DP-SGD at the sites and, stacked, ACTIVE
    mode (the sites' registry folder shared on this machine) and DP-FedAvg on the unmasked sum."""
    from fedcore.secagg import default_threshold
    from fedcore.secagg.config import Mode

    out = tmp_path / "run"
    extra = ["secagg.mode=active", "dp.server.epsilon=20", "dp.server.noise_multiplier=0.7"]
    result = fedcore(
        "simulate",
        *("--set", "sites=3", "--set", "rounds=2", "--set", "local_epochs=1"),
        *(
            "--set",
            "secagg.enabled=true",
            "--set",
            "dp.site.epsilon=8",
            "--set",
            "dp.site.noise_multiplier=1.0",
        ),
        *(a for kv in (extra if stacked else []) for a in ("--set", kv)),
        *("--out", str(out)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    from fedcore.runrecord import read_rows

    rows = read_rows(out, operator=True)  # with DP, the per-site diagnostics are in operator.jsonl
    assert len(rows) == 2
    mode = Mode.ACTIVE if stacked else Mode.SEMI_HONEST
    for row in rows:
        assert row["sites_replied"] == 3 and len(row["secagg"]["survivors"]) == 3
        assert row["secagg"]["threshold"] == default_threshold(3, mode=mode)
        assert ("consistency" in row["secagg"]["stage_seconds"]) == stacked
        assert set(row["site_epsilon"]) == {"0", "1", "2"}
        assert all(0 < eps <= 8 for eps in row["site_epsilon"].values())
        assert (row["server_epsilon"] is not None) == stacked
    assert rows[1]["site_epsilon"]["0"] > rows[0]["site_epsilon"]["0"]
    privacy = json.loads((out / "privacy.json").read_text())
    # Under site-level DP the site ledgers would reveal who took part: operator.jsonl only.
    assert set(privacy["sites"]) == (set() if stacked else {"0", "1", "2"})
    site_files = sorted(
        p.name for p in (out / "sites").iterdir() if p.is_file() and not p.name.startswith(".")
    )
    kinds = (
        "ledger.json",
        "ledger.seal",
        *(("secagg.cert.pem",) if stacked else ()),
        "secagg.journal",
        "secagg.key",
        "secagg.seal",
    )
    assert site_files == [
        *(["secagg-ca.pem"] if stacked else []),
        *(f"site-{i}.{kind}" for i in range(3) for kind in kinds),
    ]
    if stacked:
        assert 0 < rows[0]["server_epsilon"] < rows[1]["server_epsilon"] <= 20
        assert len(privacy["federation"]["entries"]) == 2
        registry = sorted((out / "sites" / "secagg-registry").glob("*.ed25519.pub"))
        assert len(registry) == 3


@pytest.mark.slow
def test_the_main_job_its_time_and_accuracy(tmp_path, capsys):
    """The README's main job (`make run`: `fedcore simulate` with the defaults on the bundled
    digits), as CI runs it: completed, with the accuracy it has reached since it was first
    measured. Its wall time is printed into CI's log, never asserted."""
    import time

    started = time.monotonic()
    result = fedcore("simulate", "--out", str(tmp_path / "run"))
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    ]
    accuracy = rows[-1]["eval_accuracy"]
    with capsys.disabled():
        print(f"\nmain job (fedcore simulate, defaults): {seconds:.1f} s, accuracy {accuracy:.4f}")
    assert status["status"] == "completed" and len(rows) == status["rounds_completed"]
    assert accuracy >= 0.95, accuracy  # 0.9666 when measured for issue 13 (12 s on 2 cores)


def test_a_killed_runs_handshake_folder_is_removed_by_the_next_run(tmp_path):
    """A `fedcore simulate` killed outright leaves its handshake folder (with the data-plan
    cache); the next run removes those whose owner no longer runs, and only those."""
    from fedcore.cli.simulate import HANDSHAKE_PREFIX, remove_stale_handshakes

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{HANDSHAKE_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{HANDSHAKE_PREFIX}{os.getpid()}-def"
    other = tmp_path / "fedcore-simulate-notapid"
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "data.npz").write_bytes(b"x")
    assert remove_stale_handshakes(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_client_cpus_above_the_core_count_is_named_with_the_core_count():
    from fedcore.cli.simulate import cpu_warning
    from fedcore.config import resolve

    warning = cpu_warning(resolve(overrides=["client_cpus=64"]), cores=2)
    assert warning is not None
    assert "client_cpus=64" in warning and "2 CPU cores" in warning and "client_cpus=2" in warning
    assert cpu_warning(resolve(overrides=["client_cpus=2"]), cores=2) is None
    on_a_cluster = resolve(overrides=["client_cpus=64", "ray_address=auto"])
    assert cpu_warning(on_a_cluster, cores=2) is None  # the cluster's CPUs count, not ours
