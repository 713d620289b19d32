"""The experiment mode ``distributed`` (issue 22, point 5): it maps to distributed DP under secure
aggregation, its ``dp.distributed.*`` axes leave the central baseline once, and the results read
its epsilon, against the server, from the federation ledger (with the stand-in simulate)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from fedcore.config import resolve
from fedcore.experiment import Mode, parse_spec, plan
from fedcore.experiment.spec import PRIVACY_KEYS, mode_settings
from fedcore.protections import protections_of
from tests.experiment.fake_simulate import DIST_L2, DIST_NOISERS, DIST_SHARE
from tests.experiment.test_experiment import _run

SPEC = """
[experiment]
name = "distributed"

[base]
dataset = "synthetic"
sites = 4
rounds = 2
local_epochs = 1

[axes]
mode = ["site-secagg", "distributed"]
epsilon = [4]
"dp.distributed.mechanism" = ["dgauss", "skellam"]
"dp.distributed.bits" = [12, 16]
seed = [0, 1]
"""


def test_the_mode_sets_the_distributed_budget_under_secure_aggregation() -> None:
    settings = mode_settings(Mode.DISTRIBUTED, 4.0)
    assert settings == {"dp.distributed.epsilon": 4.0, "secagg.enabled": True}
    assert "dp.distributed.epsilon" in PRIVACY_KEYS
    protections = protections_of(resolve(values={**settings, "sites": 4}))
    assert protections.distributed is not None and protections.secagg is not None


def test_distributed_axes_apply_to_distributed_points_only() -> None:
    points = plan(parse_spec(SPEC))
    by_mode = {m: [p for p in points if p.mode is m] for m in (Mode.SITE_SECAGG, Mode.DISTRIBUTED)}
    assert len(by_mode[Mode.SITE_SECAGG]) == 2  # one per seed, not per mechanism and bits
    assert len(by_mode[Mode.DISTRIBUTED]) == 2 * 2 * 2
    for p in by_mode[Mode.SITE_SECAGG]:
        assert not any(k.startswith("dp.distributed.") for k in p.settings)
        assert p.swept["dp.distributed.bits"] is None and p.settings["dp.server.epsilon"] == 4.0
    skellam = next(
        p
        for p in by_mode[Mode.DISTRIBUTED]
        if p.swept["dp.distributed.mechanism"] == "skellam" and p.swept["dp.distributed.bits"] == 12
    )
    assert skellam.settings["dp.distributed.epsilon"] == 4.0
    assert (
        skellam.settings["secagg.enabled"] is True and "dp.server.epsilon" not in skellam.settings
    )
    assert "dp.distributed.bits=12" in skellam.overrides()
    assert skellam.run_id.startswith("mode-distributed_epsilon-4_dp.distributed.mechanism-skellam")


def test_results_read_the_distributed_epsilon_and_its_noise(tmp_path: Path) -> None:
    out, calls = tmp_path / "exp", tmp_path / "calls.txt"
    points = _run(SPEC, out, calls)
    assert len(calls.read_text().split()) == len(points) == 10
    rows = {r["run_id"]: r for r in csv.DictReader((out / "results.csv").open())}
    dist = rows[
        "mode-distributed_epsilon-4_dp.distributed.mechanism-skellam_dp.distributed.bits-16_seed-1"
    ]
    assert float(dist["server_epsilon"]) == pytest.approx(4.0)
    assert float(dist["epsilon_spent"]) == pytest.approx(4.0)
    # no amplification is claimed against the server: the sample-known epsilon is the same one
    assert float(dist["server_epsilon_sample_known"]) == pytest.approx(4.0)
    assert float(dist["noise_multiplier"]) == pytest.approx(
        DIST_NOISERS**0.5 * DIST_SHARE / DIST_L2
    )
    assert (dist["sampling_rate"], dist["steps"]) == ("1.0", "2")
    central = rows["mode-site-secagg_epsilon-4_seed-0"]
    assert central["dp.distributed.mechanism"] == "" and float(central["server_epsilon"]) == 4.0
    summary = (out / "summary.md").read_text()
    assert "| distributed | 4 | dgauss | 12 | 2 | 4.000 | 1e-05 | 1.500 | 1.0000 | 2 |" in summary
    assert "| site-secagg | 4 | - | - | 2 | 4.000 | 1e-05 | 2.820 |" in summary
    assert "| distributed | 4 | skellam | 16 | 2 | - | 4.000 | 4.000 |" in summary
    for name in ("dp.distributed.bits_vs_accuracy.png", "dp.distributed.mechanism_vs_accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
