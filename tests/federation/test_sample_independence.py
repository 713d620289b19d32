"""What a site-level DP run publishes is a function of the settings and the released models, never
of who was sampled (issue 20, point 1): two runs whose Poisson samples differ publish the same
epsilons; the realised sample-known epsilon, which grows with the most-sampled site's count, is the
operator's alone."""

from __future__ import annotations

import json

import pytest

from fedcore.config import resolve
from fedcore.crypto import CryptoRng
from fedcore.federation.server import dp_round
from fedcore.federation.server.serve import run_server
from fedcore.runrecord import read_rows
from tests.federation.conftest import FakeGrid, honest

NODES = {11: honest, 12: honest, 13: honest, 14: honest}
_REAL_CREATE = dp_round.DPFedAvgRound.create.__func__


def _run(tmp_path, monkeypatch, name: str, seed: int):
    def seeded(cls, mechanism, ledger, rng=None):  # tests only: a seeded sample
        return _REAL_CREATE(cls, mechanism, ledger, CryptoRng.from_seed(seed, purpose="test"))

    monkeypatch.setattr(dp_round.DPFedAvgRound, "create", classmethod(seeded))
    out = tmp_path / name
    overrides = ["sites=4", "local_epochs=1", "rounds=4", "fraction_train=0.5"]
    overrides += ["dp.server.epsilon=40", "dp.server.noise_multiplier=1.0", f"out={out}"]
    settings = resolve(overrides=overrides)
    run_server(FakeGrid(settings, NODES), settings, out)
    return out


def _epsilons(rows, *keys):
    return [[row.get(k) for k in keys] for row in rows]


def test_published_epsilons_do_not_depend_on_the_sample(tmp_path, monkeypatch):
    keys = (
        "server_epsilon",
        "server_epsilon_sample_known",
        "server_epsilon_sample_known_replace_one",
    )
    runs = [_run(tmp_path, monkeypatch, f"seed-{seed}", seed) for seed in (1, 2, 3)]
    realised = [
        [row["server_epsilon_sample_known_realised"] for row in read_rows(out, operator=True)]
        for out in runs
    ]
    assert len({tuple(r) for r in realised}) > 1, "the seeds must sample differently"
    published = [_epsilons(read_rows(out), *keys) for out in runs]
    assert all(p == published[0] for p in published)
    assert all(len(row) == len(keys) and None not in row for row in published[0])
    documents = [json.loads((out / "privacy.json").read_text())["rounds"] for out in runs]
    assert all(d == documents[0] for d in documents)
    for out in runs:  # the realised value is nowhere in the public files
        for row in read_rows(out):
            assert "server_epsilon_sample_known_realised" not in row
        assert "realised" not in (out / "privacy.json").read_text()


def test_the_replace_one_epsilon_is_the_halved_noise(tmp_path, monkeypatch):
    """Under replace-one the sensitivity is 2C: the published value is the Gaussian of noise
    multiplier z/2 over the rounds, above the zero-out one."""
    from fedcore.privacy import GaussianEvent, epsilon

    out = _run(tmp_path, monkeypatch, "run", 5)
    last = read_rows(out)[-1]
    expected = epsilon([GaussianEvent(noise_multiplier=0.5, count=4)], delta=1e-5)
    assert last["server_epsilon_sample_known_replace_one"] == pytest.approx(expected, rel=1e-6)
    assert last["server_epsilon_sample_known_replace_one"] > last["server_epsilon_sample_known"]


def _secagg_run(tmp_path, monkeypatch, name: str, seed: int):
    from tests.federation.test_secagg_rounds import _run as run_federation

    monkeypatch.setattr(dp_round, "CryptoRng", lambda: CryptoRng.from_seed(seed, purpose="test"))
    overrides = ["sites=8", "local_epochs=1", "rounds=3", "fraction_train=0.15"]
    overrides += ["secagg.enabled=true", "secagg.timeout=5", "dp.server.delta=0.3"]
    overrides += ["dp.server.epsilon=40", "dp.server.noise_multiplier=1.0"]
    nodes = {node: honest for node in range(21, 29)}
    _, _, rows, _ = run_federation(tmp_path, name, overrides, nodes)
    return tmp_path / name


def test_secure_aggregation_rounds_skipped_for_the_sample_publish_the_same(tmp_path, monkeypatch):
    """Under secure aggregation a round with fewer than 2 sampled sites is skipped. It used to be
    published uncharged (server_epsilon NaN, the epsilon sequence flat there), which told that the
    sample was small; now every round is charged, so seeds that skip different rounds publish the
    same epsilons."""
    keys = ("server_epsilon", "server_epsilon_sample_known")
    runs = [_secagg_run(tmp_path, monkeypatch, f"seed-{seed}", seed) for seed in range(1, 7)]
    skipped = [
        tuple(
            "nothing released" in str(r.get("failures", {}).get("round", ""))
            for r in read_rows(out, operator=True)
        )
        for out in runs
    ]
    assert len(set(skipped)) > 1, "the seeds must skip different rounds"
    published = [_epsilons(read_rows(out), *keys) for out in runs]
    assert all(p == published[0] for p in published), "stopped by charging every round"
    assert all(None not in row for row in published[0])


def test_the_progress_line_shows_no_loss_or_sample_counts_under_site_level_dp(
    tmp_path, monkeypatch
):
    """Issue 20, point 2: the console (saved as an experiment point's log) printed the training
    loss and how many sites were sampled and replied, under site-level DP."""
    import io

    from rich.console import Console

    from fedcore.federation.server.progress import RichReporter
    from fedcore.protections import protections_of
    from fedcore.runrecord import RoundRow

    out = _run(tmp_path, monkeypatch, "run", 4)
    settings = resolve(overrides=["sites=4", "fraction_train=0.5", "dp.server.epsilon=40"])
    row = RoundRow.from_json(read_rows(out, operator=True)[-1])
    hidden = RichReporter(
        Console(file=io.StringIO()), publication=protections_of(settings).publication
    )
    line = hidden.round_line(row, rounds=4)
    assert "sites" not in line and "loss nan" not in line and "eval loss" in line
    assert f"{row.sites_replied}/{row.sites_sampled}" not in line
    shown = RichReporter(Console(file=io.StringIO())).round_line(row, rounds=4)
    assert "sites" in shown, "the plain reporter still shows them (so the test can fail)"


def test_a_deployed_run_with_site_level_dp_needs_a_persistent_federation_ledger(
    tmp_path, monkeypatch
):
    """Issue 20, point 5: a federation ledger kept per run lets every new deployed run spend the
    sites' budget afresh. Outside fedcore's simulation the server refuses it before any round."""
    from fedcore.errors import ConfigError
    from fedcore.federation.site.folders import SIMULATION_MARKER

    monkeypatch.delenv(SIMULATION_MARKER)
    base = ["sites=4", "local_epochs=1", "rounds=1", "dp.server.epsilon=40"]
    settings = resolve(overrides=[*base, "dp.server.noise_multiplier=1.0", f"out={tmp_path}/a"])
    with pytest.raises(ConfigError, match="dp.server.state_dir"):
        run_server(FakeGrid(settings, NODES), settings, tmp_path / "a")
    assert not (tmp_path / "a" / "history.jsonl").exists() or not read_rows(tmp_path / "a")
    kept = resolve(
        overrides=[
            *base,
            "dp.server.noise_multiplier=1.0",
            f"dp.server.state_dir={tmp_path}/federation",
            f"out={tmp_path}/b",
        ]
    )
    run_server(FakeGrid(kept, NODES), kept, tmp_path / "b")
    assert len(read_rows(tmp_path / "b")) == 1
