"""What a round skipped for too few sampled sites reveals, as a probability the ledger charges.

Under secure aggregation with site-level DP, sites are Poisson-sampled at rate ``q`` and a round
needs some number of them for the protocol (at least 2, at least the threshold, and a shape
every site's default floors accept). A round whose sample is too small is skipped: nothing is
released, and the model stays as it was, which an observer sees. Whether a round is skipped is a
function of the sample's size, which the amplified epsilon assumes secret.

The bound. Fix a site ``j`` and the other ``N - 1`` sites; ``K ~ Binomial(N - 1, q)`` sampled
others, and ``B ~ Bernoulli(q)`` whether ``j`` is sampled (drawn in both neighbouring worlds, used
only in the one with ``j``). The two worlds' outputs can differ in whether the round runs only on
the event ``E = {B = 1 and runs(K) != runs(K + 1)}``, whose probability

    p = q * sum_k P(K = k) * [runs(k) != runs(k + 1)]

does not depend on the data. Outside ``E`` either ``j`` is not sampled (the outputs have the same
law), both worlds skip (the same), or both run and differ by ``j``'s clipped update in the noised
sum: a mixture of Poisson-subsampled Gaussian pairs at rate ``q`` (``j`` is in with probability at
most ``q`` given not ``E``), dominated by the round's Poisson event by joint convexity. So each
round is the Poisson event plus :class:`~fedcore.privacy.events.RevealedWithProbability` ``(p)``,
and ``T`` rounds cost ``1 - (1 - p)^T`` of delta (the accountant's rule for that event). The
charge is made for every scheduled round, skipped or not, so the published epsilons are a
function of the settings only (never of which rounds were skipped).

Not covered: a site whose own node config asks for more participants than the run's settings
(``secagg-min-participants``), or a site that fails to enrol (active mode), makes rounds fail for
reasons this bound does not count; set the run's ``secagg.threshold`` to cover the sites' floors.

Hand-written: no library bounds this event (dp-accounting has no failure-probability event).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fedcore.errors import ConfigError


def _log_binomial_pmf(k: int, n: int, q: float) -> float:
    if q >= 1.0:
        return 0.0 if k == n else -math.inf
    return (
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(q)
        + (n - k) * math.log1p(-q)
    )


def skip_reveal_probability(*, sites: int, rate: float, runs: Callable[[int], bool]) -> float:
    """``p`` of the module docstring: the probability, for one round, that adding a site changes
    whether the round runs. ``runs(n)``: whether a round with ``n`` sampled sites runs. 0.0 when
    every site is sampled (``rate`` 1) or the round runs at every size from 0 up."""
    if isinstance(sites, bool) or not isinstance(sites, int) or sites < 1:
        raise ConfigError(f"sites must be an integer >= 1, got {sites!r}")
    if not 0 < rate <= 1:
        raise ConfigError(f"rate must be in (0, 1], got {rate!r}")
    if rate == 1.0:
        return 0.0
    others = sites - 1
    total, ran = 0.0, runs(0)
    for k in range(others + 1):
        weight = math.exp(_log_binomial_pmf(k, others, rate))
        after = runs(k + 1)  # each size asked once: runs() checks the protocol's safe rules
        if after != ran:
            total += weight
        ran = after
    return min(1.0, rate * total)


def delta_used(probability: float, rounds: int) -> float:
    """``1 - (1 - p)^rounds``: the delta ``rounds`` such rounds use up."""
    return -math.expm1(rounds * math.log1p(-probability)) if probability > 0 else 0.0
