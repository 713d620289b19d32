"""The sample-known site-level epsilon: the Gaussian composed over the rounds the most-sampled site
took part in, carried across runs as an upper bound."""

import json

import pytest

from fedcore.privacy import GaussianEvent, epsilon
from fedcore.privacy.dpfedavg import ServerDPConfig, SiteSampling
from fedcore.privacy.sample_known import ParticipationTally, sample_known_epsilon


def test_the_tally_counts_the_most_sampled_site_and_carries_maxima_across_runs(tmp_path):
    path = tmp_path / "federation.participation.json"
    first = ParticipationTally.open(path)
    first.record([1, 2])
    first.record([2, 3])
    first.record([2])
    assert first.max_rounds() == 3 and first.max_rounds(extra=1) == 4
    # only the maximum is written: no site identities on disk
    assert list(json.loads(path.read_text())["runs"].values()) == [3]
    second = ParticipationTally.open(path)  # node ids may differ: carry 3 for any site
    second.record([7])
    assert second.max_rounds() == 4


def test_epsilon_is_the_unamplified_gaussian_over_those_rounds():
    config = ServerDPConfig(total_sites=10, sites_per_round=5, noise_multiplier=1.3, clip_norm=1)
    event = config.sample_known_event()
    assert event == GaussianEvent(noise_multiplier=1.3)
    got = sample_known_epsilon(event, rounds=4, delta=1e-5, accountant="pld")
    assert got == pytest.approx(epsilon([GaussianEvent(1.3, count=4)], delta=1e-5))
    amplified = epsilon([config.round_event()] * 8, delta=1e-5)
    assert got > amplified  # q = 0.5: knowing the sample costs more than 8 secret-sampled rounds
    assert sample_known_epsilon(event, rounds=0, delta=1e-5, accountant="pld") == 0.0
    fixed = ServerDPConfig(
        total_sites=10,
        sites_per_round=5,
        noise_multiplier=1.3,
        clip_norm=1,
        sampling=SiteSampling.FIXED_SIZE,
    )
    assert fixed.sample_known_event() == GaussianEvent(noise_multiplier=0.65)  # sensitivity 2C
