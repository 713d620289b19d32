"""The one-run audit bound (Steinke, Nasr, Jagielski 2023) against independent computations.

Reference values: the paper's bound is checked (1) against its closed form where one exists
(delta = 0, every guess right: p = (1 - confidence)^(1/r), epsilon = log(p / (1 - p))), (2)
against a separate evaluation of Theorem 5.2's right-hand side with exact integer binomials
(``math.comb``, no scipy), and (3) by simulation: guesses as accurate as epsilon-DP randomised
response allows refute epsilon-DP in at most about 5 % of seeded trials. We found no table of the
paper's numeric bounds to compare with, so no value here is copied from the paper.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from fedcore.audit.bound import best_bound, epsilon_lower_bound, guess_counts, p_value
from fedcore.audit.canaries import guess_threshold
from fedcore.errors import ConfigError


def _p_value_exact(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Theorem 5.2's right-hand side, with exact binomial coefficients."""
    p = Fraction(1) / (1 + Fraction(math.exp(-eps)))
    pmf = [Fraction(math.comb(r, k)) * p**k * (1 - p) ** (r - k) for k in range(r + 1)]
    tail = sum(pmf[v:], Fraction(0))
    alpha = max((sum(pmf[v - i : v], Fraction(0)) / i for i in range(1, v + 1)), default=Fraction(0))
    return float(min(Fraction(1), tail + 2 * m * Fraction(delta) * alpha))


@pytest.mark.parametrize("r", [10, 100, 1000, 30000])
def test_all_right_without_delta_is_the_closed_form(r: int) -> None:
    p = 0.05 ** (1 / r)
    expected = math.log(p / (1 - p))
    got = epsilon_lower_bound(canaries=r, guesses=r, correct=r, delta=0.0, confidence=0.95)
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [(100, 100, 80, 1.0, 1e-5), (200, 60, 50, 2.0, 1e-3), (50, 50, 50, 3.0, 1e-2), (300, 120, 70, 0.5, 0.0)],
)
def test_p_value_matches_an_exact_evaluation(m: int, r: int, v: int, eps: float, delta: float) -> None:
    got = p_value(canaries=m, guesses=r, correct=v, epsilon=eps, delta=delta)
    assert got == pytest.approx(_p_value_exact(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_the_bound_is_where_the_p_value_crosses_the_level() -> None:
    m, r, v, delta = 1000, 1000, 800, 1e-5
    eps = epsilon_lower_bound(canaries=m, guesses=r, correct=v, delta=delta)
    assert 0 < eps < math.log(0.8 / 0.2)  # below the plug-in estimate: a confidence bound
    assert p_value(canaries=m, guesses=r, correct=v, epsilon=eps, delta=delta) < 0.05
    assert p_value(canaries=m, guesses=r, correct=v, epsilon=eps + 1e-4, delta=delta) >= 0.05
    # delta only weakens the claim: a larger delta gives a smaller bound
    assert epsilon_lower_bound(canaries=m, guesses=r, correct=v, delta=1e-3) < eps
    # chance-level guessing refutes nothing
    assert epsilon_lower_bound(canaries=m, guesses=r, correct=500, delta=delta) == 0.0


def test_randomised_response_at_epsilon_is_refuted_at_most_about_five_percent_of_the_time() -> None:
    rng = np.random.default_rng(14)
    eps0, m, trials = 1.0, 500, 300
    accuracy = math.exp(eps0) / (1 + math.exp(eps0))  # the best any eps0-DP guesser can do
    correct = rng.binomial(m, accuracy, size=trials)
    bounds = [epsilon_lower_bound(canaries=m, guesses=m, correct=int(v), delta=0.0) for v in correct]
    refuted = sum(b > eps0 for b in bounds)
    assert refuted <= 0.05 * trials + 3 * math.sqrt(0.05 * 0.95 * trials)
    assert np.median(bounds) > 0.3  # yet not vacuous: the bound sees most of the leakage


def test_bad_counts_are_refused() -> None:
    for m, r, v in [(10, 11, 5), (10, 5, 6), (10, 5, -1)]:
        with pytest.raises(ConfigError, match="correct <= guesses <= canaries"):
            p_value(canaries=m, guesses=r, correct=v, epsilon=1.0, delta=0.0)
    with pytest.raises(ConfigError, match="confidence"):
        epsilon_lower_bound(canaries=10, guesses=10, correct=10, delta=0.0, confidence=1.0)


def test_best_bound_splits_the_confidence_among_the_guess_counts() -> None:
    scores = np.array([5.0] * 50 + [0.0] * 50)
    truth = np.array([True] * 50 + [False] * 50)
    one = best_bound(scores, truth, delta=0.0, counts=[100])
    assert (one.guesses, one.correct) == (100, 100)
    assert one.epsilon_lower_bound == pytest.approx(
        epsilon_lower_bound(canaries=100, guesses=100, correct=100, delta=0.0)
    )
    several = best_bound(scores, truth, delta=0.0, counts=[100, 50, 20])
    assert several.epsilon_lower_bound < one.epsilon_lower_bound  # paid for the choice
    assert guess_counts(100) == (100, 50, 24, 12)


def test_guess_threshold_is_where_the_score_densities_cross() -> None:
    assert guess_threshold(sample_rate=0.3, steps=20, noise_multiplier=0.0) == 0.5
    q, t, z = 0.25, 40, 1.5
    x = guess_threshold(sample_rate=q, steps=t, noise_multiplier=z)
    mean, var_out, var_in = q * t, t * z * z, t * (q * (1 - q) + z * z)
    density_in = math.exp(-((x - mean) ** 2) / (2 * var_in)) / math.sqrt(var_in)
    density_out = math.exp(-(x * x) / (2 * var_out)) / math.sqrt(var_out)
    assert 0 < x < mean and density_in == pytest.approx(density_out, rel=1e-6)
