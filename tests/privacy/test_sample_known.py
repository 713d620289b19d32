"""The sample-known site-level epsilon: the Gaussian composed over the rounds the most-sampled site
took part in, carried across runs as an upper bound."""

import json
import math

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from fedcore.errors import ConfigError
from fedcore.privacy import GaussianEvent, epsilon
from fedcore.privacy.dpfedavg import ServerDPConfig, SiteSampling
from fedcore.privacy.relations import SiteRelation
from fedcore.privacy.sample_known import (
    ParticipationTally,
    sample_known_epsilon,
    sample_known_round_event,
    worst_case_sample_known_epsilon,
)


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


# -- which relation the sample-known epsilon holds for (issue 20) ------------------------------


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of the Gaussian mechanism with sensitivity/sigma ``mu`` (Balle and Wang
    2018, Thm 8), solved here with scipy alone: no dp-accounting, no fedcore."""

    def excess(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(excess, 0.0, 200.0, xtol=1e-12)


# The issue's run: k rounds of the Gaussian with noise multiplier z compose to one Gaussian with
# mu = sqrt(k) / z (Dong, Roth and Su 2019, Cor. 3.3); mu = 1.12374 gives 5.013 at delta 1e-5.
ROUNDS, DELTA = 20, 1e-5
Z = math.sqrt(ROUNDS) / 1.1237383558


def test_zero_out_and_replace_one_match_the_independent_values_of_the_issue():
    zero = sample_known_round_event(noise_multiplier=Z, relation=SiteRelation.ZERO_OUT)
    replace = sample_known_round_event(noise_multiplier=Z, relation=SiteRelation.REPLACE_ONE)
    assert replace.noise_multiplier == pytest.approx(Z / 2)  # sensitivity 2C
    got_zero = sample_known_epsilon(zero, rounds=ROUNDS, delta=DELTA, accountant="pld")
    got_replace = sample_known_epsilon(replace, rounds=ROUNDS, delta=DELTA, accountant="pld")
    mu = math.sqrt(ROUNDS) / Z
    assert _gaussian_epsilon(mu, DELTA) == pytest.approx(5.013, abs=5e-4)
    assert _gaussian_epsilon(2 * mu, DELTA) == pytest.approx(11.553, abs=5e-4)
    # PLD is an upper bound, within its discretisation of the exact value
    assert _gaussian_epsilon(mu, DELTA) - 1e-9 <= got_zero <= _gaussian_epsilon(mu, DELTA) * 1.002
    assert (
        _gaussian_epsilon(2 * mu, DELTA) - 1e-9
        <= got_replace
        <= _gaussian_epsilon(2 * mu, DELTA) * 1.002
    )


def test_no_sample_known_epsilon_is_claimed_for_add_or_remove():
    with pytest.raises(ConfigError, match="whether the site exists"):
        sample_known_round_event(noise_multiplier=Z, relation=SiteRelation.ADD_REMOVE)
    config = ServerDPConfig(total_sites=10, sites_per_round=5, noise_multiplier=Z, clip_norm=1)
    with pytest.raises(ConfigError):
        config.sample_known_event(SiteRelation.ADD_REMOVE)
    assert config.sample_known_event() == GaussianEvent(noise_multiplier=Z)  # zero-out, as before
    assert config.sample_known_event(SiteRelation.REPLACE_ONE) == GaussianEvent(Z / 2)


def test_the_relations_are_named_once_with_the_wording_the_record_prints():
    assert SiteRelation.ADD_REMOVE.value == "add or remove one whole site"
    assert SiteRelation.ZERO_OUT.value.startswith("zero-out one whole site")
    assert SiteRelation.REPLACE_ONE.value.startswith("replace one whole site's update")
    assert [r.sensitivity_factor for r in SiteRelation] == [1.0, 1.0, 2.0]


# -- the worst case over samples, publishable (issue 20) ---------------------------------------


def test_the_worst_case_counts_every_released_round_whatever_the_sample(tmp_path):
    path = tmp_path / "federation.participation.json"
    first = ParticipationTally.open(path)
    for sample in ([1, 2], [3], [1, 3]):  # the most-sampled site took part in 2 of 3 rounds
        first.record(sample)
    event = GaussianEvent(noise_multiplier=Z)
    now = first.epsilons(event, delta=DELTA, accountant="pld")
    assert now.relation is SiteRelation.ZERO_OUT
    assert now.realised == pytest.approx(_gaussian_epsilon(math.sqrt(2) / Z, DELTA), rel=2e-3)
    assert now.worst_case == pytest.approx(_gaussian_epsilon(math.sqrt(3) / Z, DELTA), rel=2e-3)
    assert now.worst_case == worst_case_sample_known_epsilon(
        event, rounds=3, delta=DELTA, accountant="pld"
    )
    # a different sample with the same schedule: the realised value moves, the worst case does not
    other = ParticipationTally.open(None)
    for sample in ([1], [2], [3]):
        other.record(sample)
    again = other.epsilons(event, delta=DELTA, accountant="pld")
    assert again.realised < now.realised and again.worst_case == now.worst_case
    # across runs the worst case carries every earlier run's released rounds
    second = ParticipationTally.open(path)
    second.record([9])
    assert second.max_rounds() == 3 and second.worst_case_rounds() == 4
    assert json.loads(path.read_text())["rounds"] == {first.run_id: 3, second.run_id: 1}


def test_a_tally_written_before_rounds_were_kept_still_opens(tmp_path):
    path = tmp_path / "federation.participation.json"
    path.write_text(json.dumps({"format": "fedcore.privacy.participation", "runs": {"ab": 2}}))
    tally = ParticipationTally.open(path)
    assert tally.max_rounds() == 2 and tally.worst_case_rounds() == 2
