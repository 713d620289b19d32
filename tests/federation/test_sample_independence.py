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
