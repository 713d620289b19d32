"""The epsilon lower bound of a one-run privacy audit (Steinke, Nasr, Jagielski, NeurIPS 2023).

Theory of operation. "Privacy auditing with one (1) training run", Steinke, Nasr and Jagielski,
NeurIPS 2023 (arXiv:2305.08846). ``m`` canaries are each included in the training data
independently with probability 1/2. After training, the auditor makes ``r`` guesses (included or
not) about ``r`` of the canaries and abstains on the rest; ``v`` guesses are right. If training is
``(epsilon, delta)``-DP, the number of correct guesses is nearly dominated by a binomial
(Theorem 5.2; the paper's Algorithm 2 in code):

    P[correct >= v] <= P[Binomial(r, p) >= v] + 2 m delta * max_{i=1..v} P[v > Binomial(r, p) >= v - i] / i,
    p = e^epsilon / (1 + e^epsilon).

So an observed ``v`` whose right-hand side is below ``1 - confidence`` refutes
``(epsilon, delta)``-DP at that confidence, and the lower bound is the largest such epsilon
(found by bisection, since the right-hand side grows with epsilon). With ``delta = 0`` and
``v = r`` the bound is the closed form ``log(p / (1 - p))`` with ``p = (1 - confidence)^(1/r)``.

Choosing how many guesses to make after seeing the scores would void the confidence, so
:func:`best_bound` tries a fixed list of guess counts and divides ``1 - confidence`` among them
(Bonferroni): the reported bound holds at ``confidence`` for the best of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcore.errors import ConfigError

EPSILON_CAP = 100.0  # the search stops here; a bound this large means "no DP at all"


def _binomial():  # noqa: ANN202 - scipy.stats.binom, imported when first needed
    from scipy.stats import binom

    return binom


def p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of at least ``correct`` right guesses out of ``guesses`` under (epsilon, delta)-DP.

    Theorem 5.2 / Algorithm 2 of Steinke et al. (module docstring). Raises ConfigError for
    counts that do not satisfy ``0 <= correct <= guesses <= canaries``.
    """
    _check_counts(canaries, guesses, correct)
    if not (math.isfinite(epsilon) and epsilon >= 0) or not 0 <= delta <= 1:
        raise ConfigError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon!r}, {delta!r}")
    binom = _binomial()
    p = 1.0 / (1.0 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomised response
    tail = float(binom.sf(correct - 1, guesses, p))  # P[Binomial(r, p) >= v]
    if delta == 0 or correct == 0:
        return min(1.0, tail)
    # alpha = max_i P[v > W >= v - i] / i, the cumulative pmf below v divided by the window width
    below = binom.pmf(np.arange(correct - 1, -1, -1), guesses, p)  # pmf at v-1, v-2, ..., 0
    alpha = float(np.max(np.cumsum(below) / np.arange(1, correct + 1)))
    return min(1.0, tail + 2.0 * canaries * delta * alpha)


def epsilon_lower_bound(
    *, canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """The largest epsilon that ``correct`` of ``guesses`` refutes at ``confidence`` (0 if none).

    Bisection to within 1e-6 on ``[0, EPSILON_CAP]``.
    """
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    level = 1.0 - confidence

    def refuted(eps: float) -> bool:
        return (
            p_value(canaries=canaries, guesses=guesses, correct=correct, epsilon=eps, delta=delta)
            < level
        )

    if not refuted(0.0):
        return 0.0
    if refuted(EPSILON_CAP):
        return EPSILON_CAP
    low, high = 0.0, EPSILON_CAP  # refuted(low), not refuted(high)
    while high - low > 1e-6:
        mid = (low + high) / 2
        if refuted(mid):
            low = mid
        else:
            high = mid
    return low


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    for name, value in (("canaries", canaries), ("guesses", guesses), ("correct", correct)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not 0 <= correct <= guesses <= canaries:
        raise ConfigError(
            f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}"
        )


@dataclass(frozen=True, slots=True)
class AuditBound:
    """The best bound over the guess counts tried, and the guesses that gave it."""

    epsilon_lower_bound: float
    confidence: float
    canaries: int
    guesses: int
    correct: int
    guess_counts_tried: tuple[int, ...]


def guess_counts(canaries: int, *, smallest: int = 10) -> tuple[int, ...]:
    """The guess counts tried: every canary, then halving down to ``smallest`` (even counts)."""
    counts = []
    r = canaries - canaries % 2
    while r >= smallest:
        counts.append(r)
        r = (r // 2) - (r // 2) % 2
    return tuple(counts) or ((canaries - canaries % 2) or canaries,)


def best_bound(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    counts: Sequence[int] | None = None,
) -> AuditBound:
    """Guess "included" for the ``r/2`` highest scores and "excluded" for the ``r/2`` lowest.

    For each ``r`` in ``counts`` (default :func:`guess_counts`), with ``1 - confidence`` split
    evenly among them; returns the largest bound. Ties are broken by canary index, never by the
    truth.
    """
    s = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(included, dtype=bool)
    if s.ndim != 1 or s.shape != truth.shape or len(s) < 2 or not np.all(np.isfinite(s)):
        raise ConfigError(
            f"need one finite score per canary (>= 2), got shapes {s.shape}, {truth.shape}"
        )
    m = len(s)
    tried = tuple(counts) if counts is not None else guess_counts(m)
    per_test = 1.0 - (1.0 - confidence) / len(tried)
    order = np.argsort(-s, kind="stable")  # highest score first
    best = AuditBound(0.0, confidence, m, 0, 0, tried)
    for r in tried:
        half = r // 2
        if half < 1 or 2 * half > m:
            raise ConfigError(f"guess count {r} needs between 2 and {m} canaries")
        correct = int(truth[order[:half]].sum() + (~truth[order[m - half :]]).sum())
        eps = epsilon_lower_bound(
            canaries=m, guesses=2 * half, correct=correct, delta=delta, confidence=per_test
        )
        if eps > best.epsilon_lower_bound:
            best = AuditBound(eps, confidence, m, 2 * half, correct, tried)
    return best
