"""What a round skipped for too few sampled sites reveals (fedcore.privacy.skips), checked against
values computed independently: subset enumeration for the probability, the mechanism's exact
privacy profile for the bound, and the accountant's rule for RevealedWithProbability."""

from __future__ import annotations

import itertools
import math

import dp_accounting
import numpy as np
import pytest
from scipy import integrate, stats

from fedcore.privacy import PoissonSubsampledGaussian, RevealedWithProbability, epsilon
from fedcore.privacy.events import event_from_json, event_to_json
from fedcore.privacy.skips import delta_used, skip_reveal_probability


def _enumerated(sites: int, rate: float, runs) -> float:
    """P(site j sampled and runs(|others sampled|) != runs(|others sampled| + 1)), by listing
    every subset of the other sites."""
    total = 0.0
    for chosen in itertools.product((0, 1), repeat=sites - 1):
        k = sum(chosen)
        weight = rate**k * (1 - rate) ** (sites - 1 - k)
        if runs(k) != runs(k + 1):
            total += rate * weight
    return total


@pytest.mark.parametrize("sites,rate,least", [(6, 0.3, 2), (7, 0.5, 3), (9, 0.1, 2), (5, 0.9, 4)])
def test_the_skip_probability_matches_subset_enumeration(sites, rate, least):
    runs = lambda n: n >= least  # noqa: E731
    got = skip_reveal_probability(sites=sites, rate=rate, runs=runs)
    assert got == pytest.approx(_enumerated(sites, rate, runs), rel=1e-12)


def test_no_sampling_or_a_round_that_always_runs_reveals_nothing():
    assert skip_reveal_probability(sites=10, rate=1.0, runs=lambda n: n >= 2) == 0.0
    assert skip_reveal_probability(sites=10, rate=0.3, runs=lambda n: True) == 0.0


def test_the_accountant_spends_the_reveal_out_of_delta():
    poisson = PoissonSubsampledGaussian(sampling_rate=0.2, noise_multiplier=1.5)
    p, rounds, delta = 1e-7, 30, 1e-5
    with_reveal = [poisson, RevealedWithProbability(p)] * rounds
    left = delta - (1 - (1 - p) ** rounds)
    assert delta_used(p, rounds) == pytest.approx(1 - (1 - p) ** rounds, rel=1e-12)
    assert epsilon(with_reveal, delta=delta) == pytest.approx(
        epsilon([poisson] * rounds, delta=left), rel=1e-9
    )
    assert epsilon(with_reveal, delta=delta) > epsilon([poisson] * rounds, delta=delta)
    assert epsilon([poisson, RevealedWithProbability(1e-3)] * 10, delta=delta) == math.inf
    assert event_from_json(event_to_json(RevealedWithProbability(p))) == RevealedWithProbability(p)


def _true_delta(eps: float, *, sites: int, rate: float, sigma: float, least: int) -> float:
    """The exact hockey-stick divergence, both directions, of one skip-or-release round: every
    site's (clipped, 1-D) update is 1, the output is 'skipped' when fewer than ``least`` are
    sampled, else the sum plus N(0, sigma^2); site j present against absent."""
    others = stats.binom(sites - 1, rate)

    def law(with_j: bool):
        skip, parts = 0.0, []  # parts: (weight, mean) of the Gaussian components
        for k in range(sites):
            pk = others.pmf(k)
            for b, pb in ((0, 1 - rate), (1, rate)) if with_j else ((0, 1.0),):
                n = k + b
                if n < least:
                    skip += pk * pb
                else:
                    parts.append((pk * pb, float(n)))
        return skip, parts

    def density(parts, y):
        return sum(w * stats.norm.pdf(y, loc=mu, scale=sigma) for w, mu in parts)

    def divergence(p, q):
        (ps, pp), (qs, qp) = p, q
        atoms = max(0.0, ps - math.exp(eps) * qs)
        f = lambda y: max(0.0, density(pp, y) - math.exp(eps) * density(qp, y))  # noqa: E731
        cont, _ = integrate.quad(f, -12 * sigma, sites + 12 * sigma, limit=400)
        return atoms + cont

    present, absent = law(True), law(False)
    return max(divergence(present, absent), divergence(absent, present))


def _poisson_gaussian_delta(eps: float, *, rate: float, sigma: float) -> float:
    pld = dp_accounting.pld.privacy_loss_distribution.from_gaussian_mechanism(
        sigma, sampling_prob=rate, value_discretization_interval=1e-4
    )
    return float(pld.get_delta_for_epsilon(eps))


@pytest.mark.parametrize("sites,rate,least", [(2, 0.5, 2), (3, 0.5, 2), (4, 0.3, 3)])
@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
def test_the_bound_covers_the_mechanisms_exact_privacy_profile(sites, rate, least, eps):
    """delta(eps) of the real skip-or-release round <= delta of the Poisson Gaussian + p."""
    sigma = 1.0
    p = skip_reveal_probability(sites=sites, rate=rate, runs=lambda n: n >= least)
    true = _true_delta(eps, sites=sites, rate=rate, sigma=sigma, least=least)
    bound = _poisson_gaussian_delta(eps, rate=rate, sigma=sigma) + p
    assert true <= bound + 1e-9
    if sites == 2:  # the skip alone tells: the bound is tight up to the Gaussian's part
        assert true >= p - 1e-9


def test_the_skip_is_a_real_leak_at_small_federations():
    """Without the charge: with 2 sites at rate 0.5, whether the round ran reveals site j's
    presence with probability 1/4 whatever the noise: no Gaussian accounting can see it."""
    true = _true_delta(5.0, sites=2, rate=0.5, sigma=100.0, least=2)
    assert true == pytest.approx(0.25, abs=1e-6)
    assert _poisson_gaussian_delta(5.0, rate=0.5, sigma=100.0) < 1e-12
    assert np.isclose(skip_reveal_probability(sites=2, rate=0.5, runs=lambda n: n >= 2), 0.25)
