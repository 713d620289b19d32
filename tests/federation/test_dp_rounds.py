"""Record-level and site-level DP inside the federation: declines, budget stops, the record."""

import json

import pytest

from fedcore.config import resolve
from fedcore.errors import BudgetExceededError
from fedcore.federation.server.serve import run_server
from fedcore.privacy import PoissonSubsampledGaussian, PrivacyLedger, epsilon
from fedcore.runrecord import read_rows
from tests.federation.conftest import FakeGrid, honest, nan_update


def _rows(path):
    """history.jsonl merged with operator.jsonl (the diagnostics DP keeps out of the record)."""
    return read_rows(path, operator=True)


def test_sites_with_a_small_budget_train_some_rounds_then_decline(tmp_path):
    # With z = 1 each round costs about 1.8 then 2.2 epsilon cumulatively at these sizes (see
    # `fedcore budget --sample-rate 0.0418 --noise-multiplier 1 --steps 24/48`): 2.4 affords two.
    out = tmp_path / "run"
    settings = resolve(
        overrides=[
            "sites=3",
            "rounds=5",
            "local_epochs=1",
            "dp.site.epsilon=2.4",
            "dp.site.noise_multiplier=1.0",
            f"out={out}",
        ]
    )
    run_server(FakeGrid(settings, {11: honest, 12: honest, 13: honest}), settings, out)
    rows = _rows(out)
    assert [(r["sites_replied"], r["sites_declined"], r["sites_failed"]) for r in rows] == [
        (3, 0, 0),
        (3, 0, 0),
        (0, 3, 0),
    ]
    for site in ("0", "1", "2"):
        spent = [r["site_epsilon"][site] for r in rows]
        assert 0 < spent[0] < spent[1] <= 2.4 and spent[2] == spent[1]
        # The reported epsilon is what the site's own ledger on disk says.
        ledger = PrivacyLedger.load(out / "sites" / f"site-{site}.ledger.json")
        assert len(ledger.entries) == 2 and ledger.epsilon() == pytest.approx(spent[1])
        assert ledger.epsilon() == pytest.approx(epsilon(ledger.events, delta=1e-5))
    summary = (out / "summary.md").read_text()
    assert "stopped after round 3: every sampled site declined" in summary
    privacy = json.loads((out / "privacy.json").read_text())
    assert set(privacy["sites"]) == {"0", "1", "2"} and privacy["federation"] is None
    assert [r["sites_declined"] for r in privacy["rounds"]] == [0, 0, 3]
    assert (out / "privacy.png").stat().st_size > 0 and (out / "model.pt").exists()


def test_federation_budget_stops_the_run_before_the_round_that_would_exceed_it(tmp_path):
    # q = 1, z = 2: 1.99 after one round, 2.94 after two, 3.71 after three (Gaussian composition).
    out = tmp_path / "run"
    settings = resolve(
        overrides=[
            "sites=3",
            "rounds=6",
            "local_epochs=1",
            "dp.server.epsilon=3.2",
            "dp.server.noise_multiplier=2.0",
            "dp.server.clip_norm=0.5",
        ]
    )
    run_server(FakeGrid(settings, {11: honest, 12: honest, 13: nan_update}), settings, out)
    rows = _rows(out)
    assert len(rows) == 2
    assert [r["server_epsilon"] for r in rows] == pytest.approx([1.9931, 2.9432], abs=2e-3)
    assert [(r["sites_sampled"], r["sites_replied"], r["sites_failed"]) for r in rows] == [
        (3, 2, 1)
    ] * 2
    assert "round 3 not run" in (out / "summary.md").read_text()
    # The ledger survives: reloaded, it reports the same spend and refuses the same charge.
    ledger = PrivacyLedger.load(out / "federation.ledger.json")
    assert ledger.epsilon() == pytest.approx(rows[-1]["server_epsilon"])
    with pytest.raises(BudgetExceededError):
        ledger.charge(PoissonSubsampledGaussian(sampling_rate=1.0, noise_multiplier=2.0))
    assert len(ledger.entries) == 2


def test_server_dp_with_a_server_optimizer(tmp_path):
    out = tmp_path / "run"
    settings = resolve(
        overrides=[
            "sites=3",
            "rounds=2",
            "local_epochs=1",
            "strategy=fedadam",
            "dp.server.epsilon=50",
            "dp.server.clipping=adaptive",
            "dp.server.noise_multiplier=0.5",
        ]
    )
    run_server(FakeGrid(settings, {11: honest, 12: honest, 13: honest}), settings, out)
    rows = _rows(out)
    assert len(rows) == 2 and rows[1]["server_epsilon"] > rows[0]["server_epsilon"] > 0
    assert rows[0]["clip_norm"] == 1.0 and rows[1]["clip_norm"] != 1.0  # adaptive clipping moved C
