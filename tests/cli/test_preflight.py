"""Settings that cannot work are refused before Ray starts: one line, exit 2, no record left."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcore.config import resolve
from fedcore.errors import ConfigError
from fedcore.federation.simulation.engine import child_env

ROOT = Path(__file__).resolve().parents[2]


def fedcore(*args, cwd=ROOT):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "fedcore.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result, time.monotonic() - started


def refused(result, fragment):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("fedcore simulate: error:"), result.stderr
    assert fragment in lines[0], lines[0]
    assert "ray" not in result.stderr.lower().replace(lines[0].lower(), "")


def test_out_folder_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    result, _ = fedcore("simulate", "--set", "sites=2", "--out", str(tmp_path / "file" / "run"))
    refused(result, "cannot be written")


def test_out_folder_on_a_read_only_file_system(tmp_path):
    # /proc refuses new folders even to root (chmod would not stop root).
    result, _ = fedcore("simulate", "--set", "sites=2", "--out", "/proc/fedcore-run/x")
    refused(result, "cannot be written")
    assert not Path("/proc/fedcore-run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only mode")
def test_out_folder_in_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result, _ = fedcore("simulate", "--set", "sites=2", "--out", str(locked / "run"))
    refused(result, "cannot be written")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["client_gpus=0.5"], "no GPU is visible"),
        (["sites=3", "secagg.enabled=true", "secagg.threshold=5"], "more than the 3 sites"),
        (
            ["sites=4", "fraction_train=0.5", "secagg.enabled=true", "secagg.threshold=3"],
            "more than the 2 sites",
        ),
        (["model=not_a_module_here:Net"], "could not be loaded"),
        (
            ["sites=3", "dp.server.epsilon=0.01", "dp.server.noise_multiplier=0.3"],
            "cannot afford one round",
        ),
        (
            ["sites=2", "dp.site.epsilon=0.01", "dp.site.noise_multiplier=0.3"],
            "cannot afford one round",
        ),
        (  # calibrated noise: the calibration's refusal, with the setting and the costs named
            ["sites=2", "dp.site.epsilon=0.001"],
            "dp.site.epsilon=0.001 cannot be met by the 20 planned rounds at site 0",
        ),
    ],
)
def test_refused_before_ray_starts_leaving_no_record(tmp_path, overrides, fragment):
    if "client_gpus=0.5" in overrides:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    out = tmp_path / "deep" / "run"
    args = [a for kv in overrides for a in ("--set", kv)]
    result, seconds = fedcore("simulate", *args, "--out", str(out))
    refused(result, fragment)
    assert not (tmp_path / "deep").exists()
    print(f"refused in {seconds:.1f} s")


def test_a_model_next_to_the_users_files_is_found(tmp_path, monkeypatch):
    """As with `python -m`: the working directory is on the import path, in preflight and, through
    PYTHONPATH, in the child and Ray's workers."""
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def net(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))\n"
    )
    from fedcore.cli import preflight

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    preflight.check(resolve(overrides=["sites=2", "model=mymodels:net"]))
    assert child_env(tmp_path)["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path.resolve())


def test_resume_refuses_a_changed_federation_and_a_missing_record(tmp_path):
    result, _ = fedcore("simulate", "--resume", str(tmp_path / "none"))
    refused(result, "no run record to resume")
    result, _ = fedcore("simulate", "--resume", str(tmp_path), "--out", str(tmp_path / "x"))
    refused(result, "--resume takes its settings")


def test_an_existing_record_is_not_overwritten(tmp_path):
    (tmp_path / "history.jsonl").write_text("")
    result, _ = fedcore("simulate", "--set", "sites=2", "--out", str(tmp_path))
    refused(result, "--resume DIR")


def test_parse_overrides_checks_each_key():
    from fedcore.config import parse_overrides

    assert parse_overrides(["rounds=7", "round_timeout=3"]) == {"rounds": 7, "round_timeout": 3.0}
    with pytest.raises(ConfigError, match="unknown setting"):
        parse_overrides(["colour=blue"])


from tests.federation.conftest import flower_identity  # noqa: E402,F401 - a fixture


@pytest.mark.usefixtures("flower_identity")
def test_a_crashed_run_is_closed_as_failed_or_removed_if_nothing_ran(tmp_path):
    import json

    from fedcore.cli.simulate import close_crashed, report
    from fedcore.federation.server.serve import run_server
    from tests.federation.conftest import FakeGrid, honest

    settings = resolve(overrides=["sites=2", "rounds=1", "local_epochs=1", "round_timeout=5"])
    out = tmp_path / "run"
    run_server(FakeGrid(settings, {1: honest, 2: honest}), settings, out)
    (out / "status.json").unlink()  # as if the server process had died before closing
    close_crashed(out, returncode=-9, resumed=False)
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and "exited with status -9" in status["reason"]
    assert report(out, settings, returncode=-9) == 1

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    (bare / "history.jsonl").write_text("")
    close_crashed(bare, returncode=1, resumed=False)
    assert not bare.exists()


def _no_expensive_step(*args, **kwargs):
    raise AssertionError("a refusal that cheap checks can make must not reach this step")


@pytest.mark.parametrize(
    ("overrides", "out", "fragment"),
    [
        (["sites=2"], "file/run", "cannot be written"),
        (["sites=3", "secagg.enabled=true", "secagg.threshold=5"], "run", "more than the 3"),
        (["model=not_a_module_here:Net"], "run", "could not be loaded"),
    ],
)
def test_cheap_refusals_come_before_the_data_loads(tmp_path, monkeypatch, overrides, out, fragment):
    """The out folder, the threshold and the model's import are refused before any data is
    loaded (seconds) and leave nothing behind."""
    from fedcore.cli import preflight

    monkeypatch.setattr(preflight, "data_and_model", _no_expensive_step)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=fragment):
        preflight.check_run(resolve(overrides=overrides), tmp_path / out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_round_far_over_the_site_budget_is_refused_on_the_quick_bound(monkeypatch):
    """The accountant's exact cost (seconds for small noise) is not computed when the quick
    lower bound already exceeds the budget; the message says "at least"."""
    from fedcore.federation.site.folders import check_site_round
    from fedcore.privacy import accountant

    monkeypatch.setattr(accountant._DpAccountingAccountant, "epsilon", _no_expensive_step)
    accountant._cached_epsilon.cache_clear()
    settings = resolve(
        overrides=["sites=2", "dp.site.epsilon=0.01", "dp.site.noise_multiplier=0.3"]
    )
    with pytest.raises(ConfigError, match=r"costs epsilon at least \d"):
        check_site_round(settings, num_examples=575, site_id=0, exact=False)
    with pytest.raises(ConfigError, match=r"costs epsilon at least \d"):
        check_site_round(settings, num_examples=575, site_id=0)


def test_a_budget_the_calibration_cannot_meet_names_the_setting_costs_and_a_budget_that_works():
    """dp.site.epsilon=0.001 (issue 25 point 6): the message names the setting, what one round
    costs at the largest noise the calibration tries, and a budget that the calibration meets."""
    import re

    from fedcore.cli.preflight import dp_affords_one_round

    sizes = [575, 575]
    with pytest.raises(ConfigError) as refused:
        dp_affords_one_round(
            resolve(overrides=["sites=2", "dp.site.epsilon=0.001"]), dim=0, site_sizes=sizes
        )
    message = str(refused.value)
    assert message.startswith("dp.site.epsilon=0.001 cannot be met by the 20 planned rounds")
    one = re.search(
        r"one round \(\d+ DP-SGD steps at sampling rate [\d.]+\) costs epsilon (\S+),", message
    )
    assert one is not None and 0 < float(one.group(1)) < 0.001  # one round fits; 20 do not
    suggested = re.search(r"dp\.site\.epsilon=(\S+) can be met", message)
    assert suggested is not None and float(suggested.group(1)) > 0.001
    # The suggestion is true: the same federation with that budget passes the check.
    good = resolve(overrides=["sites=2", f"dp.site.epsilon={suggested.group(1)}"])
    dp_affords_one_round(good, dim=0, site_sizes=sizes)
