"""What a DP run publishes (issue 11): two site-level epsilons named for their observers, nothing
the guarantee does not cover, the budget that binds, a federation ledger that composes across
runs, and settings that cannot work refused before the run."""

from __future__ import annotations

import json
import stat

import pytest

from fedcore.cli import main as cli
from fedcore.config import resolve
from fedcore.errors import ConfigError, LedgerLostError
from fedcore.federation.server.dp_round import check_before_run
from fedcore.federation.server.serve import run_server
from fedcore.federation.site.folders import check_site_round
from fedcore.privacy import GaussianEvent, PrivacyLedger, epsilon
from fedcore.privacy.sample_known import TALLY_FILE
from fedcore.runrecord import SITE_LEVEL_WITHHELD, read_rows
from tests.federation.conftest import FakeGrid, honest, nan_update

NODES = {11: honest, 12: honest, 13: honest, 14: honest}


def _run(out, overrides, behaviours=None):
    settings = resolve(overrides=["sites=4", "local_epochs=1", *overrides, f"out={out}"])
    run_server(FakeGrid(settings, behaviours or NODES), settings, out)
    return settings


def _known(z, k):
    return 0.0 if k == 0 else epsilon([GaussianEvent(noise_multiplier=z, count=k)], delta=1e-5)


def test_site_level_dp_publishes_two_epsilons_and_no_sample(tmp_path):
    out = tmp_path / "run"
    behaviours = {**NODES, 14: nan_update}  # a failure whose node id must not be published
    _run(
        out,
        [
            "rounds=3",
            "fraction_train=0.5",
            "dp.server.epsilon=30",
            "dp.server.noise_multiplier=1.0",
        ],
        behaviours,
    )
    public = read_rows(out)
    assert len(public) == 3
    for row in public:
        assert not set(SITE_LEVEL_WITHHELD) & set(row), row
        assert row["server_epsilon"] > 0 and row["server_epsilon_sample_known"] >= 0
    # Published: the sample-known epsilon of a site sampled in all 3 released rounds (the same
    # whatever was sampled); the realised one, over the most-sampled site's rounds, is the
    # operator's (issue 20, point 1: it grows with who was sampled).
    tally = json.loads((out / TALLY_FILE).read_text())["runs"]
    (most,) = tally.values()  # only the most rounds any site took part in is written
    assert public[-1]["server_epsilon_sample_known"] == pytest.approx(_known(1.0, 3))
    operator_rows = read_rows(out, operator=True)
    assert operator_rows[-1]["server_epsilon_sample_known_realised"] == pytest.approx(
        _known(1.0, most)
    )
    # ... which is what the attack gets: without amplification, more than server_epsilon
    if most >= 2:
        assert public[-1]["server_epsilon_sample_known"] > public[-1]["server_epsilon"]
    # What was withheld is in operator.jsonl, private to the operator.
    operator = out / "operator.jsonl"
    assert stat.S_IMODE(operator.stat().st_mode) == 0o600
    merged = read_rows(out, operator=True)
    assert {"sites_sampled", "num_examples", "failures"} <= set(merged[0])
    summary = (out / "summary.md").read_text()
    assert "operator.jsonl" in summary and "sampled" not in summary.split("| round |")[1]
    assert "who also knows which sites took part" in summary
    assert "Neither holds against the server" in summary
    for node in behaviours:  # no node id anywhere in the public files
        for name in ("history.jsonl", "summary.md", "privacy.json"):
            assert f'"{node}"' not in (out / name).read_text()
        assert f"node {node}" not in summary
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["server_neighbouring_relation"] == "add or remove one whole site"
    assert privacy["server_budget"]["binds"] == "observers"
    assert [r["server_epsilon_sample_known"] for r in privacy["rounds"]] == [
        r["server_epsilon_sample_known"] for r in public
    ]
    assert "discrete Gaussian" in privacy["noise"]


def test_the_budget_can_bind_the_sample_known_epsilon(tmp_path):
    """budget_against = sample-known: the run stops before any site's epsilon, counted without
    amplification over the rounds it took part in, would pass the budget."""
    out = tmp_path / "run"
    budget = _known(2.0, 2) + 1e-3  # two participations fit, a third does not
    _run(
        out,
        [
            "rounds=6",
            "fraction_train=1.0",
            f"dp.server.epsilon={budget}",
            "dp.server.noise_multiplier=2.0",
            "dp.server.budget_against=sample-known",
        ],
    )
    rows = read_rows(out)
    assert len(rows) == 2
    assert rows[-1]["server_epsilon_sample_known"] == pytest.approx(_known(2.0, 2))
    assert rows[-1]["server_epsilon_sample_known"] <= budget
    assert "round 3 not run" in (out / "summary.md").read_text()


def test_the_federation_ledger_composes_across_runs_in_its_state_dir(tmp_path):
    state = tmp_path / "state"
    common = [
        "rounds=2",
        "dp.server.epsilon=30",
        "dp.server.noise_multiplier=2.0",
        f"dp.server.state_dir={state}",
    ]
    _run(tmp_path / "one", common)
    _run(tmp_path / "two", common)
    second = read_rows(tmp_path / "two")
    ledger = PrivacyLedger.load(state / "federation.ledger.json")
    assert len(ledger.entries) == 4  # two runs, two rounds each, one ledger
    assert second[-1]["server_epsilon"] == pytest.approx(ledger.epsilon())
    assert second[0]["server_epsilon"] > read_rows(tmp_path / "one")[-1]["server_epsilon"]
    assert second[-1]["server_epsilon_sample_known"] == pytest.approx(_known(2.0, 4))
    # A deleted federation ledger does not restart at 0, even with its seal deleted too (the
    # participation tally says rounds were released); the operator's reset is recorded.
    (state / "federation.ledger.json").unlink()
    with pytest.raises(LedgerLostError, match="seal records 4 charges"):
        _run(tmp_path / "three", common)
    (state / "federation.ledger.seal").unlink()
    with pytest.raises(LedgerLostError, match="has released data before"):
        _run(tmp_path / "four", common)
    reset = ["ledger", "reset", "--state-dir", str(state), "--federation", "--reason", "moved"]
    assert cli(reset) == 0
    _run(tmp_path / "five", [*common, "rounds=1"])
    entries = PrivacyLedger.load(state / "federation.ledger.json").entries
    assert len(entries) == 2 and "moved" in entries[0].label


def test_record_level_dp_keeps_the_count_at_the_site(tmp_path):
    out = tmp_path / "run"
    _run(out, ["rounds=1", "dp.site.epsilon=20"])
    (row,) = read_rows(out)
    assert "num_examples" not in row and "train_loss" not in row
    assert row["site_eval_accuracy"] is not None  # stays, labelled outside the guarantee
    (merged,) = read_rows(out, operator=True)
    assert merged["num_examples"] == 4  # four sites, each reporting weight 1, not its size
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["site_neighbouring_relation"].startswith("add or remove one training record")
    assert "site acc (outside DP)" in (out / "summary.md").read_text()


@pytest.mark.parametrize("group", ["site", "server"])
def test_a_noise_multiplier_without_a_budget_is_refused(group):
    with pytest.raises(ConfigError, match=f"dp.{group}.epsilon' is unset"):
        resolve(overrides=[f"dp.{group}.noise_multiplier=1.0"])
    assert cli(["simulate", "--set", f"dp.{group}.noise_multiplier=1.0"]) == 2


def test_a_budget_one_round_cannot_afford_is_refused_before_the_run(tmp_path, capsys):
    settings = resolve(overrides=["dp.server.epsilon=0.1", "dp.server.noise_multiplier=0.5"])
    with pytest.raises(ConfigError, match=r"one round costs epsilon \d"):
        check_before_run(settings, dim=100)
    code = cli(
        [
            "simulate",
            "--set",
            "dp.server.epsilon=0.1",
            "--set",
            "dp.server.noise_multiplier=0.5",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2 and "one round costs epsilon" in capsys.readouterr().err
    assert not (tmp_path / "r" / "history.jsonl").exists()
    site = resolve(overrides=["dp.site.epsilon=0.05", "dp.site.noise_multiplier=0.5"])
    with pytest.raises(ConfigError, match="one round .* costs epsilon"):
        check_site_round(site, num_examples=200, site_id=0)


def test_a_secagg_ring_too_small_for_dp_is_refused_before_the_run(tmp_path, capsys):
    code = cli(
        [
            "simulate",
            "--set",
            "secagg.enabled=true",
            "--set",
            "dp.server.epsilon=4",
            "--set",
            "secagg.bits=8",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2 and "secagg.bits" in capsys.readouterr().err


def test_a_closed_or_resumed_record_publishes_no_more_than_the_live_one(tmp_path):
    # Closing an interrupted run and resuming one rewrite history.jsonl from the checkpoint, which
    # holds every field: the rewrite must withhold what the live run withheld, and the checkpoint
    # itself is private.
    from fedcore.federation.server.serve import close_interrupted

    out = tmp_path / "run"
    _run(out, ["rounds=2", "fraction_train=0.5", "dp.server.epsilon=30", "dp.server.noise_multiplier=1.0"])
    close_interrupted(out, reason="test")
    rows = read_rows(out)
    assert len(rows) == 2
    for row in rows:
        assert not set(SITE_LEVEL_WITHHELD) & set(row), row
    assert stat.S_IMODE((out / "checkpoint.pt").stat().st_mode) == 0o600
