"""The discrete Gaussian's charge (issue 20): an exact 1-D curve and a proven multivariate bound,
each checked against a computation made here without fedcore's code."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from fedcore.errors import ConfigError
from fedcore.privacy import (
    FixedSizeSubsampledGaussian,
    GaussianEvent,
    PoissonSubsampledGaussian,
    SelfComposedEvent,
    calibrate_noise_multiplier,
    epsilon,
)
from fedcore.privacy.discrete_charge import (
    charge_gap,
    discrete_gaussian_delta,
    discrete_gaussian_epsilon,
    zcdp_epsilon,
)


def _brute_force_delta(eps: float, sigma: float, shift: int) -> float:
    """delta(eps) = sum_y max(0, P(y) - e^eps Q(y)) for P = N_Z(0, s^2), Q = N_Z(shift, s^2):
    the hockey-stick divergence summed point by point, in both directions (the larger)."""
    reach = int(60 * sigma) + shift + 1
    y = np.arange(-reach, reach + 1, dtype=np.float64)
    p = np.exp(-(y * y) / (2 * sigma * sigma))
    p /= p.sum()
    q = np.exp(-((y - shift) ** 2) / (2 * sigma * sigma))
    q /= q.sum()
    return max(
        float(np.maximum(0.0, p - math.exp(eps) * q).sum()),
        float(np.maximum(0.0, q - math.exp(eps) * p).sum()),
    )


def _continuous_delta(eps: float, mu: float) -> float:
    return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)


@pytest.mark.parametrize(
    ("sigma", "shift", "eps"),
    [(0.5, 1, 0.5), (1.0, 1, 1.0), (2.0, 1, 0.3), (3.0, 2, 1.0), (7.5, 3, 0.2), (40.0, 16, 0.5)],
)
def test_the_exact_curve_is_the_pointwise_hockey_stick_divergence(sigma, shift, eps):
    got = discrete_gaussian_delta(epsilon=eps, sigma=sigma, sensitivity=shift)
    assert got == pytest.approx(_brute_force_delta(eps, sigma, shift), rel=1e-9, abs=1e-300)


def test_the_discrete_curve_meets_the_continuous_one_as_the_grid_gets_finer():
    """At one grid step the two curves differ by about 10%; at 256 steps by a few parts per
    million. fedcore's sensitivity spans 2**20 sqrt(d) steps or more."""
    z, eps = 1.0, 1.0
    coarse = discrete_gaussian_delta(epsilon=eps, sigma=z, sensitivity=1)
    fine = discrete_gaussian_delta(epsilon=eps, sigma=z * 256, sensitivity=256)
    exact = _continuous_delta(eps, 1 / z)
    assert abs(coarse - exact) / exact > 0.05
    assert abs(fine - exact) / exact < 1e-5


def _zcdp_by_grid(rho: float, delta: float) -> float:
    """CKS 2020 Prop 12 evaluated on a dense grid of orders (no optimiser)."""
    alpha = 1 + np.geomspace(1e-4, 1e4, 400_000)
    eps = alpha * rho + (np.log(1 / delta) - np.log(alpha)) / (alpha - 1) + np.log1p(-1 / alpha)
    return float(eps.min())


@pytest.mark.parametrize(("rho", "delta"), [(0.01, 1e-5), (0.43, 1e-5), (2.0, 1e-6), (0.1, 1e-3)])
def test_the_zcdp_conversion_matches_a_grid_search_over_orders(rho, delta):
    assert zcdp_epsilon(rho=rho, delta=delta) == pytest.approx(_zcdp_by_grid(rho, delta), rel=1e-6)


@pytest.mark.parametrize(("sigma", "shift"), [(1.0, 1), (2.0, 1), (6.0, 3)])
def test_the_bound_covers_the_exact_discrete_epsilon(sigma, shift):
    """For one release of the 1-D discrete Gaussian the proven epsilon is at least the exact one
    (solved from the pointwise divergence), at a coarse grid where the two mechanisms differ."""
    delta = 1e-5
    exact = brentq(lambda e: _brute_force_delta(e, sigma, shift) - delta, 0, 50, xtol=1e-12)
    bound = discrete_gaussian_epsilon(noise_multiplier=sigma / shift, count=1, delta=delta)
    assert bound >= exact


def test_the_gap_for_the_default_dp_fedavg_settings():
    """README's DP-FedAvg: epsilon 4 over the default 20 rounds at delta 1e-5, every site sampled
    (fraction_train 1): the ledger charges 4.0; the proven discrete bound is 4.324."""
    z = calibrate_noise_multiplier(target_epsilon=4, delta=1e-5, sample_rate=1.0, steps=20)
    round_event = PoissonSubsampledGaussian(sampling_rate=1.0, noise_multiplier=z)
    got = charge_gap(SelfComposedEvent(event=round_event, count=20), delta=1e-5)
    assert got.count == 20 and got.noise_multiplier == z
    assert got.charged == pytest.approx(epsilon([round_event] * 20, delta=1e-5))
    mu = math.sqrt(20) / z  # 20 Gaussian rounds are one Gaussian with mu = sqrt(20) / z
    continuous = brentq(lambda e: _continuous_delta(e, mu) - 1e-5, 0, 50, xtol=1e-12)
    assert got.charged == pytest.approx(continuous, rel=1e-6)
    assert got.discrete_bound == pytest.approx(_zcdp_by_grid(20 / (2 * z * z), 1e-5), rel=1e-6)
    assert got.gap == pytest.approx(0.324, abs=2e-3)


def test_events_without_a_proven_bound_are_refused():
    with pytest.raises(ConfigError, match="no proven discrete-Gaussian bound"):
        charge_gap(PoissonSubsampledGaussian(sampling_rate=0.1, noise_multiplier=1.0), delta=1e-5)
    fixed = FixedSizeSubsampledGaussian(sample_size=5, population_size=10, noise_multiplier=2.0)
    assert charge_gap(fixed, delta=1e-5).noise_multiplier == 1.0  # the Gaussian of 2C
    assert charge_gap(GaussianEvent(1.0, count=3), delta=1e-5).count == 3
    with pytest.raises(ConfigError):
        discrete_gaussian_delta(epsilon=1.0, sigma=1.0, sensitivity=0)
