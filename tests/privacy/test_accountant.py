"""The accountant against independently computed epsilons.

References used here, none of them fedcore's own code:
- the exact privacy profile of the Gaussian mechanism (Balle and Wang, "Improving the Gaussian
  Mechanism for Differential Privacy", ICML 2018, Thm 8), evaluated with scipy;
- Opacus's PRV accountant (Gopi, Lee and Wutschitz, NeurIPS 2021), a second library, which also
  gives a lower bound on epsilon;
- TF Privacy's published figure for its MNIST example.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy.optimize import brentq
from scipy.stats import norm

from fedcore.errors import ConfigError
from fedcore.privacy.accountant import (
    AccountantKind,
    calibrate_noise_multiplier,
    canonical_mechanisms,
    epsilon,
)
from fedcore.privacy.events import (
    ComposedEvent,
    FixedSizeSubsampledGaussian,
    GaussianEvent,
    NonPrivate,
    NoPrivacyLoss,
    PoissonSubsampledGaussian,
    PrivacyEvent,
    SelfComposedEvent,
    UnsupportedEventError,
)


def exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle and Wang 2018, Thm 8: for sensitivity 1 and noise sigma, the mechanism is (eps, delta)
    with delta(eps) = Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma)."""

    def delta_of(eps: float) -> float:
        a = 1 / (2 * sigma)
        return norm.cdf(a - eps * sigma) - math.exp(eps) * norm.cdf(-a - eps * sigma)

    if delta_of(0.0) <= delta:
        return 0.0
    return brentq(lambda e: delta_of(e) - delta, 0.0, 500.0, xtol=1e-12)


@pytest.mark.parametrize(
    ("sigma", "steps", "delta"), [(2.0, 16, 1e-5), (5.0, 100, 1e-6), (0.8, 1, 1e-5)]
)
def test_q1_composes_into_one_gaussian_with_sigma_over_sqrt_t(sigma, steps, delta):
    # At q = 1, T Gaussians with noise sigma are one Gaussian with noise sigma / sqrt(T).
    exact = exact_gaussian_epsilon(sigma / math.sqrt(steps), delta)
    ours = epsilon(
        PoissonSubsampledGaussian(sampling_rate=1.0, noise_multiplier=sigma, count=steps),
        delta=delta,
    )
    as_sequence = epsilon([GaussianEvent(noise_multiplier=sigma)] * steps, delta=delta)
    assert ours == as_sequence
    # Never below the truth; the PLD grid costs at most a few thousandths here.
    assert exact <= ours <= exact + 5e-3
    rdp = epsilon(GaussianEvent(noise_multiplier=sigma, count=steps), delta=delta, accountant="rdp")
    assert rdp >= exact


def prv_bounds(q: float, sigma: float, steps: int, delta: float) -> tuple[float, float]:
    acct = PRVAccountant()
    acct.history = [(sigma, q, steps)]
    dprv = acct._get_dprv(eps_error=0.01, delta_error=delta / 1000)
    low, _, high = dprv.compute_epsilon(delta, delta / 1000, 0.01)
    return float(low), float(high)


@pytest.mark.parametrize(("q", "sigma", "steps"), [(0.01, 1.0, 1000), (0.2, 1.5, 60)])
def test_agrees_with_opacus_prv_and_never_below_its_lower_bound(q, sigma, steps):
    low, high = prv_bounds(q, sigma, steps, 1e-5)
    ours = epsilon(
        PoissonSubsampledGaussian(sampling_rate=q, noise_multiplier=sigma, count=steps), delta=1e-5
    )
    assert low <= ours <= high * 1.01


def test_tf_privacy_mnist_example():
    # TF Privacy, tensorflow_privacy/privacy/analysis/compute_dp_sgd_privacy_lib.py and the
    # MNIST tutorial README: N = 60000, batch 256, noise 1.1, 60 epochs, delta 1e-5 ->
    # "DP-SGD with sampling rate = 0.427% and noise_multiplier = 1.1 iterated over 14063 steps
    # satisfies differential privacy with eps = 3.01 and delta = 1e-05" (older RDP conversion
    # eps = min_a rdp(a) + log(1/delta) / (a - 1), orders 1.1..10.9 and 12..63).
    q, sigma, delta = 256 / 60000, 1.1, 1e-5
    steps = math.ceil(60 * 60000 / 256)
    assert steps == 14063
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = np.array(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders))
    published = float(np.min(rdp - math.log(delta) / (np.array(orders) - 1)))
    assert round(published, 2) == 3.01  # the inputs reproduce the published figure

    event = PoissonSubsampledGaussian(sampling_rate=q, noise_multiplier=sigma, count=steps)
    ours = epsilon(event, delta=delta)
    low, _ = prv_bounds(q, sigma, steps, delta)
    # fedcore's PLD is ~2.38: well under the loose 3.01, and never below a tight lower bound.
    assert low <= ours < published
    assert ours == pytest.approx(2.38, abs=0.01)
    assert ours < epsilon(event, delta=delta, accountant=AccountantKind.RDP) < published


def test_calibration_is_smallest_to_tolerance():
    q, steps, delta, target = 0.1, 100, 1e-5, 2.0
    z = calibrate_noise_multiplier(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)

    def eps(noise):
        return epsilon(
            PoissonSubsampledGaussian(sampling_rate=q, noise_multiplier=noise, count=steps),
            delta=delta,
        )

    assert eps(z) <= target < eps(z / 1.001)


def test_calibration_rdp_and_bad_inputs():
    z = calibrate_noise_multiplier(
        target_epsilon=4.0, delta=1e-5, sample_rate=0.05, steps=200, accountant="rdp"
    )
    ev = PoissonSubsampledGaussian(sampling_rate=0.05, noise_multiplier=z, count=200)
    assert epsilon(ev, delta=1e-5, accountant="rdp") <= 4.0
    for bad in (
        {"target_epsilon": 0.0},
        {"target_epsilon": math.inf},
        {"delta": 1.0},
        {"sample_rate": 0.0},
        {"steps": 0},
        {"accountant": "prv"},
    ):
        kwargs = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.1, "steps": 10, **bad}
        with pytest.raises(ConfigError):
            calibrate_noise_multiplier(**kwargs)


def test_composition_structure_and_special_events():
    g = PoissonSubsampledGaussian(sampling_rate=0.1, noise_multiplier=3.0, count=3)
    nested = ComposedEvent(events=(SelfComposedEvent(event=g, count=2), NoPrivacyLoss(), g))
    assert canonical_mechanisms(nested) == canonical_mechanisms(
        PoissonSubsampledGaussian(sampling_rate=0.1, noise_multiplier=3.0, count=9)
    )
    assert epsilon(NoPrivacyLoss(), delta=1e-5) == 0.0
    assert epsilon([g, NonPrivate()], delta=1e-5) == math.inf
    one, two = epsilon(g, delta=1e-5), epsilon([g, g], delta=1e-5)
    assert 0 < one < two


def test_fixed_size_sampling_claims_no_amplification():
    fixed = FixedSizeSubsampledGaussian(sample_size=5, population_size=50, noise_multiplier=2.0)
    poisson = PoissonSubsampledGaussian(sampling_rate=0.1, noise_multiplier=2.0)
    assert epsilon(fixed, delta=1e-5) == epsilon(GaussianEvent(noise_multiplier=1.0), delta=1e-5)
    assert epsilon(fixed, delta=1e-5) > epsilon(poisson, delta=1e-5)


def test_unknown_event_type_is_refused():
    from dataclasses import dataclass

    @dataclass(frozen=True, slots=True)
    class SkellamEvent(PrivacyEvent):
        mu: float

    with pytest.raises(UnsupportedEventError):
        epsilon(SkellamEvent(mu=3.0), delta=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: GaussianEvent(noise_multiplier=0.0),
        lambda: GaussianEvent(noise_multiplier=math.nan),
        lambda: GaussianEvent(noise_multiplier=1.0, count=0),
        lambda: PoissonSubsampledGaussian(sampling_rate=1.5, noise_multiplier=1.0),
        lambda: FixedSizeSubsampledGaussian(sample_size=6, population_size=5, noise_multiplier=1.0),
        lambda: epsilon(GaussianEvent(noise_multiplier=1.0), delta=0.0),
        lambda: epsilon(GaussianEvent(noise_multiplier=1.0), delta=1e-5, accountant="nope"),
    ],
)
def test_bad_values_raise_config_error(bad):
    with pytest.raises(ConfigError):
        bad()


@pytest.mark.parametrize(
    "events",
    [
        [PoissonSubsampledGaussian(sampling_rate=0.02783, noise_multiplier=0.3, count=180)],
        [PoissonSubsampledGaussian(sampling_rate=0.01, noise_multiplier=1.1, count=1000)],
        [PoissonSubsampledGaussian(sampling_rate=0.5, noise_multiplier=2.0, count=7)],
        [GaussianEvent(noise_multiplier=0.5, count=3)],
        [
            GaussianEvent(noise_multiplier=2.0),
            PoissonSubsampledGaussian(sampling_rate=0.1, noise_multiplier=1.0, count=50),
        ],
    ],
)
def test_the_quick_lower_bound_never_exceeds_either_accountant_and_is_close(events):
    """What preflight refuses on: the optimistic coarse PLD must stay at or below the epsilon the
    ledger would charge (PLD) and RDP's, or a run the accountant affords would be refused."""
    from fedcore.privacy.accountant import epsilon_lower_bound

    low = epsilon_lower_bound(events, delta=1e-5)
    pld = epsilon(events, delta=1e-5)
    rdp = epsilon(events, delta=1e-5, accountant="rdp")
    assert 0 < low <= pld <= rdp
    assert low > 0.6 * pld  # tight enough to refuse what is far out of budget
    assert epsilon_lower_bound([NonPrivate()], delta=1e-5) == math.inf
    assert epsilon_lower_bound([], delta=1e-5) == 0.0
