"""Distributed DP accounting (fedcore.privacy.distributed), checked independently of its formulas.

The RDP bounds coded from KLS21 (DDGauss) and AKL21 (Skellam) are compared with the Renyi
divergence of the exact noise distributions, computed numerically in one dimension: the pmf of the
sum of h discrete Gaussians by repeated convolution, the Skellam pmf by convolving two Poisson pmfs.
Each bound must lie above the exact divergence (it is an upper bound) and within a stated factor
of it (it is not vacuous); for large noise both converge to the Gaussian mechanism's
alpha Delta^2 / (2 sigma^2).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
from dp_accounting.rdp import rdp_privacy_accountant

from fedcore.errors import ConfigError
from fedcore.privacy.accountant import exact_gaussian_epsilon
from fedcore.privacy.distributed import (
    REAL_ORDERS,
    DistributedDiscreteGaussianEvent,
    DistributedNoise,
    SkellamEvent,
    distributed_epsilon,
    honest_noisers,
    min_survivors,
    rdp_to_epsilon,
    rounded_l1_bound,
    rounded_l2_bound,
)
from fedcore.privacy.distributed_plan import clip_probability, plan_distributed
from fedcore.privacy.relations import SiteRelation

ORDERS = (1.5, 2.0, 4.0, 8.0, 16.0)


def _renyi(log_p: np.ndarray, log_q: np.ndarray, alpha: float) -> float:
    """D_alpha(P || Q) = log(sum p^alpha q^(1 - alpha)) / (alpha - 1), over the common support."""
    both = np.isfinite(log_p) & np.isfinite(log_q)
    return float(scipy.special.logsumexp(alpha * log_p[both] + (1 - alpha) * log_q[both])) / (
        alpha - 1
    )


def _shifted(log_p: np.ndarray, shift: int) -> np.ndarray:
    out = np.full_like(log_p, -np.inf)
    out[shift:] = log_p[:-shift]
    return out


def _sum_of_discrete_gaussians(sigma: float, shares: int) -> np.ndarray:
    """log pmf of the sum of ``shares`` independent N_Z(0, sigma^2), by convolution."""
    reach = int(40 * sigma) + 10
    k = np.arange(-reach, reach + 1, dtype=np.float64)
    one = np.exp(-k * k / (2 * sigma * sigma))
    one /= one.sum()
    pmf = one
    for _ in range(shares - 1):
        pmf = np.convolve(pmf, one)
    with np.errstate(divide="ignore"):
        return np.log(pmf)


def _skellam_by_convolution(variance: float) -> np.ndarray:
    """log pmf of Poisson(v/2) - Poisson(v/2) on -L..L, convolving the two Poisson pmfs."""
    reach = int(variance + 60 * math.sqrt(variance)) + 60
    k = np.arange(0, reach + 1)
    pois = scipy.stats.poisson.pmf(k, variance / 2)
    pmf = np.convolve(pois, pois[::-1])  # index i holds P[X - Y = i - reach]
    with np.errstate(divide="ignore"):
        return np.log(pmf)


# (sigma, shares, shift, factor): the bound is within ``factor`` of the exact divergence.
DGAUSS_CASES = [
    (1.0, 2, 1, 1.01),
    (1.0, 5, 1, 1.01),
    (2.0, 3, 2, 1.01),
    (3.0, 4, 5, 1.01),
    (0.5, 4, 1, 3.0),  # KLS21's smallest sigma: the tau term dominates at low orders
    (0.6, 10, 1, 4.0),
]


@pytest.mark.parametrize(("sigma", "shares", "shift", "factor"), DGAUSS_CASES)
def test_ddgauss_bound_is_above_the_exact_divergence_and_within_a_factor(
    sigma: float, shares: int, shift: int, factor: float
) -> None:
    log_p = _sum_of_discrete_gaussians(sigma, shares)
    log_q = _shifted(log_p, shift)
    event = DistributedDiscreteGaussianEvent(
        l2_sensitivity=shift, l1_sensitivity=shift, noisers=shares, dim=1, sigma=sigma
    )
    for alpha in ORDERS:
        exact = _renyi(log_p, log_q, alpha)
        bound = event.rdp(alpha)
        assert bound >= exact * (1 - 1e-9), (alpha, bound, exact)
        assert bound <= factor * exact, (alpha, bound, exact)


# (variance of one share, shares, shift, factor)
SKELLAM_CASES = [
    (10.0, 2, 1, 1.2),
    (50.0, 1, 3, 1.2),
    (1000.0, 1, 10, 1.01),
    (2.0, 3, 1, 1.9),
    (5.0, 1, 1, 2.0),
    (1.0, 1, 1, 5.0),  # variance 1: the discretisation term dominates
]


@pytest.mark.parametrize(("mu", "shares", "shift", "factor"), SKELLAM_CASES)
def test_skellam_bound_is_above_the_exact_divergence_and_within_a_factor(
    mu: float, shares: int, shift: int, factor: float
) -> None:
    total = mu * shares  # a sum of Skellams is Skellam: the shares' variances add
    log_p = _skellam_by_convolution(total)
    reach = (log_p.size - 1) // 2
    # The convolution agrees with scipy's Skellam pmf (a second, independent formula).
    k = np.arange(-reach, reach + 1)
    probable = log_p > -300
    assert np.allclose(
        log_p[probable], scipy.stats.skellam.logpmf(k, total / 2, total / 2)[probable], atol=1e-6
    )
    log_q = _shifted(log_p, shift)
    event = SkellamEvent(l2_sensitivity=shift, l1_sensitivity=shift, noisers=shares, dim=1, mu=mu)
    for alpha in (2, 4, 8, 16):
        exact = _renyi(log_p, log_q, alpha)
        bound = event.rdp(alpha)
        assert bound >= exact * (1 - 1e-9), (alpha, bound, exact)
        assert bound <= factor * exact, (alpha, bound, exact)


def test_two_dimensional_bounds_cover_the_product_of_exact_divergences() -> None:
    # Independent coordinates: the exact divergence of a 2-D shift is the sum of the 1-D ones.
    shift = (2, 1)
    l2, l1 = math.hypot(*shift), float(sum(shift))
    log_g = _sum_of_discrete_gaussians(1.5, 3)
    log_s = _skellam_by_convolution(40.0)
    gauss = DistributedDiscreteGaussianEvent(
        l2_sensitivity=l2, l1_sensitivity=l1, noisers=3, dim=2, sigma=1.5
    )
    skellam = SkellamEvent(l2_sensitivity=l2, l1_sensitivity=l1, noisers=2, dim=2, mu=20.0)
    for alpha in (2, 4, 8):
        exact_g = sum(_renyi(log_g, _shifted(log_g, s), alpha) for s in shift)
        exact_s = sum(_renyi(log_s, _shifted(log_s, s), alpha) for s in shift)
        assert exact_g <= gauss.rdp(alpha) <= 1.01 * exact_g
        assert exact_s <= skellam.rdp(alpha) <= 1.2 * exact_s


def test_large_noise_converges_to_the_gaussian_mechanism() -> None:
    for alpha in (2.0, 10.0, 100.0):
        gauss = DistributedDiscreteGaussianEvent(
            l2_sensitivity=30.0, l1_sensitivity=30.0 * 8, noisers=10, dim=64, sigma=100.0
        )
        skellam = SkellamEvent(
            l2_sensitivity=30.0, l1_sensitivity=30.0 * 8, noisers=10, dim=64, mu=1e6
        )
        target = alpha * 30.0**2 / (2 * 10 * 100.0**2)  # alpha Delta^2 / (2 sigma_sum^2)
        assert gauss.rdp(alpha) == pytest.approx(target, rel=1e-9)
        assert skellam.rdp(int(alpha)) == pytest.approx(alpha * 30.0**2 / (2 * 10 * 1e6), rel=1e-6)
    # The epsilon converges too: to the Gaussian's RDP epsilon, and within the RDP conversion's
    # slack of the exact (Balle and Wang) Gaussian epsilon.
    z = 100.0 * math.sqrt(10) / 30.0
    event = DistributedDiscreteGaussianEvent(
        l2_sensitivity=30.0, l1_sensitivity=240.0, noisers=10, dim=64, sigma=100.0, count=50
    )
    orders = np.asarray(REAL_ORDERS)
    gaussian_rdp = 50 * orders / (2 * z * z)
    ours = distributed_epsilon((event,), delta=1e-6)
    assert ours == pytest.approx(rdp_to_epsilon(orders, gaussian_rdp, 1e-6), rel=1e-6)
    exact = exact_gaussian_epsilon(z / math.sqrt(50), 1e-6)
    assert exact <= ours <= 1.25 * exact


def test_conversion_matches_dp_accounting_and_composition_adds() -> None:
    event = SkellamEvent(l2_sensitivity=50.0, l1_sensitivity=400.0, noisers=20, dim=64, mu=900.0)
    orders = np.arange(2, 200)
    curve = event.rdp_curve(orders)
    theirs, _ = rdp_privacy_accountant.compute_epsilon(list(orders), list(curve), 1e-5)
    assert rdp_to_epsilon(orders, curve, 1e-5) == pytest.approx(theirs, rel=1e-12)
    twice = SkellamEvent(
        l2_sensitivity=50.0, l1_sensitivity=400.0, noisers=20, dim=64, mu=900.0, count=2
    )
    assert distributed_epsilon((event, event), delta=1e-5) == distributed_epsilon(
        (twice,), delta=1e-5
    )
    assert distributed_epsilon((twice,), delta=1e-5) > distributed_epsilon((event,), delta=1e-5)
    assert event.relation is SiteRelation.ZERO_OUT


def test_rounding_bounds_follow_kls21() -> None:
    c, d = 1000.0, 4096
    beta = math.exp(-0.5)
    expected = math.sqrt(c * c + d / 4 + math.sqrt(2 * 0.5) * (c + math.sqrt(d) / 2))
    assert rounded_l2_bound(scaled_norm=c, dim=d, beta=beta) == pytest.approx(expected)
    assert rounded_l2_bound(scaled_norm=c, dim=d, beta=0.0) == c + 64
    # A tiny vector in many coordinates: the unconditional bound is the smaller one.
    assert rounded_l2_bound(scaled_norm=0.5, dim=4, beta=1e-9) == 2.5
    assert rounded_l1_bound(l2_bound=3.0, dim=100) == 9.0  # integers: ||v||_1 <= ||v||_2^2
    assert rounded_l1_bound(l2_bound=30.0, dim=100) == 300.0  # Cauchy-Schwarz
    with pytest.raises(ConfigError, match="beta"):
        rounded_l2_bound(scaled_norm=c, dim=d, beta=1.0)


def test_who_adds_the_noise() -> None:
    assert min_survivors(sites=100, dropout_tolerance=0.1) == 90
    assert min_survivors(sites=10, dropout_tolerance=0.3) == 7  # the decimal, not 0.2999...
    assert min_survivors(sites=7, dropout_tolerance=0.0) == 7
    assert honest_noisers(sites=100, colluders=5, dropout_tolerance=0.1) == 85
    with pytest.raises(ConfigError, match="colluders"):
        honest_noisers(sites=10, colluders=7, dropout_tolerance=0.3)
    with pytest.raises(ConfigError, match="dropout_tolerance"):
        min_survivors(sites=10, dropout_tolerance=1.0)


def test_events_refuse_what_their_theorems_do_not_cover() -> None:
    with pytest.raises(ConfigError, match="sigma >= 1/2"):
        DistributedDiscreteGaussianEvent(
            l2_sensitivity=1.0, l1_sensitivity=1.0, noisers=2, dim=1, sigma=0.4
        )
    skellam = SkellamEvent(l2_sensitivity=1.0, l1_sensitivity=1.0, noisers=2, dim=1, mu=4.0)
    with pytest.raises(ConfigError, match="integer orders"):
        skellam.rdp(2.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="> 1"):
        skellam.rdp_curve((1,))
    with pytest.raises(ConfigError, match="noisers"):
        SkellamEvent(l2_sensitivity=1.0, l1_sensitivity=1.0, noisers=0, dim=1, mu=4.0)


@pytest.mark.parametrize("noise", list(DistributedNoise))
def test_the_modular_clipping_bound_covers_the_exact_noise_tail(noise: DistributedNoise) -> None:
    # No signal (a negligible clip norm): the bound must cover the exact two-sided tail of the
    # noise of n shares at t = 2**(b-1) - 1 - n, in one coordinate.
    sites, bits = 4, 8
    share = 10.0 if noise is DistributedNoise.DGAUSS else 100.0  # a sum of std 20 either way
    bound = clip_probability(noise, scaled_norm=1e-9, share=share, sites=sites, dim=1, bits=bits)
    t = (1 << (bits - 1)) - 1 - sites
    if noise is DistributedNoise.DGAUSS:
        log_p = _sum_of_discrete_gaussians(share, sites)
    else:
        log_p = _skellam_by_convolution(share * sites)
    reach = (log_p.size - 1) // 2
    k = np.arange(-reach, reach + 1)
    exact = float(np.exp(log_p)[np.abs(k) > t].sum())
    assert 1e-12 < exact <= bound <= 50 * exact


def test_a_plan_meets_its_targets() -> None:
    for noise in DistributedNoise:
        plan = plan_distributed(
            noise=noise, epsilon=4.0, delta=1e-5, rounds=100, sites=100, colluders=5,
            dropout_tolerance=0.1, bits=20, dim=10**6, clip_norm=0.5,
        )  # fmt: skip
        assert plan.padded_dim == 1 << 20 and plan.noisers == 85
        assert 3.99 <= plan.epsilon <= 4.0
        assert plan.clip_probability <= 1e-10
        assert plan.round_event(count=100).rdp(2) == pytest.approx(100 * plan.round_event().rdp(2))
        assert distributed_epsilon((plan.round_event(count=100),), delta=1e-5) == plan.epsilon
        # The noise of the honest sites alone, over the sensitivity: a noise multiplier near the
        # Gaussian's for the same epsilon (no amplification, 100 rounds).
        share = plan.site_noise**2 if noise is DistributedNoise.DGAUSS else plan.site_noise
        z = math.sqrt(plan.noisers * share) / plan.l2_sensitivity
        assert 10.0 < z < 13.0
        # One more bit of ring doubles the grid, about.
        wider = plan_distributed(
            noise=noise, epsilon=4.0, delta=1e-5, rounds=100, sites=100, colluders=5,
            dropout_tolerance=0.1, bits=21, dim=10**6, clip_norm=0.5,
        )  # fmt: skip
        assert 1.9 < wider.gamma / plan.gamma < 2.1


def test_a_plan_is_computed_once_per_setting_and_a_cached_one_still_refuses_bad_types() -> None:
    from fedcore.privacy.distributed_plan import clear_plan_cache

    clear_plan_cache()
    settings = {
        "noise": DistributedNoise.DGAUSS, "epsilon": 2.0, "delta": 1e-5, "rounds": 1,
        "sites": 10, "colluders": 0, "dropout_tolerance": 0.1, "bits": 32, "dim": 100,
        "clip_norm": 1.0,
    }  # fmt: skip
    plan = plan_distributed(**settings)
    assert plan_distributed(**settings) is plan  # cached: the same frozen plan
    assert plan_distributed.cache_info().hits == 1
    assert plan_distributed(**{**settings, "epsilon": 3.0}).site_noise < plan.site_noise
    # A bool equals 1 and hashes like it; the cache keys on types, so True is still refused.
    with pytest.raises(ConfigError, match="rounds"):
        plan_distributed(**{**settings, "rounds": True})
    clear_plan_cache()
    assert plan_distributed(**settings) is not plan
    assert plan_distributed(**settings) == plan


def test_a_ring_too_small_is_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match="dp.distributed.bits"):
        plan_distributed(
            noise=DistributedNoise.SKELLAM, epsilon=4.0, delta=1e-5, rounds=100, sites=100,
            colluders=0, dropout_tolerance=0.1, bits=16, dim=10**6, clip_norm=1.0,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="dp.distributed.epsilon"):
        plan_distributed(
            noise=DistributedNoise.DGAUSS, epsilon=-1.0, delta=1e-5, rounds=1, sites=10,
            colluders=0, dropout_tolerance=0.1, bits=32, dim=100, clip_norm=1.0,
        )  # fmt: skip
