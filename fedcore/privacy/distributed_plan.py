"""Distributed DP's parameters for a federation: the grid ``gamma`` and each site's noise share.

Theory of operation. :func:`plan_distributed` takes the largest ``gamma`` (finest grid, least
rounding error) whose noised sum stays in the ring, and for it the least honest-site noise share
meeting the target epsilon over the run's rounds (the accounting of
:mod:`fedcore.privacy.distributed`, in grid units).

Modular clipping (KLS21 Sec. 5). The sum's coordinate ``j`` is ``(HD sum_i gamma x_i)_j``, a
Rademacher sum with variance proxy ``(n C)^2 / d`` over the public random signs (assumed drawn
independently of the updates), plus rounding errors of magnitude below ``n`` in all, plus the noise
(DDGauss: ``n sigma^2``-sub-Gaussian, CKS20; Skellam: log-MGF ``n mu (cosh s - 1)``), all ``n``
sites honest and present (the widest sum). A Chernoff bound and a union over the ``d`` coordinates
bound the probability that any coordinate leaves ``[-(2**(b-1) - 1), 2**(b-1) - 1]``;
:func:`plan_distributed` takes the largest ``gamma`` keeping it below ``clip_target``.

Everything here is a pure function of public settings (epsilon, delta, rounds, sites, colluders,
tolerance, bits, dimension, clip norm, beta): :func:`plan_distributed` is cached per argument tuple,
so a server process plans a federation once (:func:`clear_plan_cache` forgets it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.optimize

from fedcore.errors import ConfigError
from fedcore.privacy.distributed import (
    DistributedDiscreteGaussianEvent,
    DistributedEvent,
    DistributedNoise,
    SkellamEvent,
    check_count,
    check_positive,
    distributed_epsilon,
    honest_noisers,
    padded_dim,
    rdp_to_epsilon,
    rounded_l1_bound,
    rounded_l2_bound,
)
from fedcore.secagg.config import MAX_BITS, MIN_BITS

CLIP_TARGET = 1e-10  # default bound on the chance that a round's sum leaves the ring
DEFAULT_BETA = math.exp(-0.5)  # KLS21's choice: about 1.6 rounding tries on average, at most


@dataclass(frozen=True, slots=True, kw_only=True)
class DistributedPlan:
    """The chosen ``gamma`` and per-site noise of a federation, and what they guarantee.

    ``site_noise`` is one honest site's share in grid units: ``sigma`` of ``N_Z(0, sigma^2)``
    (DDGauss) or the variance ``mu`` of Skellam. ``epsilon`` is against the server over
    ``rounds`` rounds at ``delta``; ``clip_probability`` bounds the chance that a round's sum
    leaves the ring (all ``sites`` present and noising, the widest sum).
    """

    noise: DistributedNoise
    gamma: float
    site_noise: float
    sites: int
    noisers: int
    dim: int
    padded_dim: int
    clip_norm: float
    beta: float
    bits: int
    l2_sensitivity: float
    l1_sensitivity: float
    clip_probability: float
    rounds: int
    delta: float
    epsilon: float

    def round_event(self, count: int = 1) -> DistributedEvent:
        """The event of ``count`` rounds, for the ledger of each site that took part in them."""
        return _event(
            self.noise,
            self.l2_sensitivity,
            self.l1_sensitivity,
            self.noisers,
            self.padded_dim,
            self.site_noise,
            count,
        )


def _event(
    noise: DistributedNoise, l2: float, l1: float, h: int, d: int, share: float, count: int
) -> DistributedEvent:
    if noise is DistributedNoise.DGAUSS:
        return DistributedDiscreteGaussianEvent(
            l2_sensitivity=l2, l1_sensitivity=l1, noisers=h, dim=d, sigma=share, count=count
        )
    return SkellamEvent(
        l2_sensitivity=l2, l1_sensitivity=l1, noisers=h, dim=d, mu=share, count=count
    )


def _share_for(
    noise: DistributedNoise,
    l2: float,
    l1: float,
    *,
    h: int,
    d: int,
    rounds: int,
    epsilon: float,
    delta: float,
) -> float:
    """The least share (sigma, or mu for Skellam) whose ``rounds`` rounds meet ``epsilon``,
    to relative precision 1e-7 on its standard deviation, rounded up (bisection on log std)."""

    def eps(std: float) -> float:
        share = std if noise is DistributedNoise.DGAUSS else std * std
        return distributed_epsilon((_event(noise, l2, l1, h, d, share, rounds),), delta=delta)

    floor = 0.5 if noise is DistributedNoise.DGAUSS else 1e-6  # KLS21 Thm 1 needs sigma >= 1/2
    hi = max(floor, l2 / math.sqrt(h))
    while eps(hi) > epsilon:
        hi *= 2.0
        if hi > 2.0**60:
            raise ConfigError(f"no noise meets dp.distributed.epsilon={epsilon}")
    lo = hi / 2.0
    while lo > floor and eps(lo) <= epsilon:
        hi, lo = lo, lo / 2.0
    if lo <= floor and eps(floor) <= epsilon:
        hi = floor
    else:
        lo = max(lo, floor)
        while hi / lo > 1.0 + 1e-7:
            mid = math.sqrt(lo * hi)
            lo, hi = (lo, mid) if eps(mid) <= epsilon else (mid, hi)
    return hi if noise is DistributedNoise.DGAUSS else hi * hi


def clip_probability(
    noise: DistributedNoise, *, scaled_norm: float, share: float, sites: int, dim: int, bits: int
) -> float:
    """A bound on P[some coordinate of a round's sum leaves the signed ring] (module docstring):
    ``2 d exp(min_s s^2 rho/2 + K(s) - s t)``, ``rho = (n C)^2 / d``, ``t = 2**(b-1) - 1 - n``
    (the rounding errors take at most ``n``), ``K`` the noise's log-MGF over ``n`` shares."""
    rho = (sites * scaled_norm) ** 2 / dim
    t = float((1 << (bits - 1)) - 1 - sites)
    if t <= 0:
        return 1.0
    if noise is DistributedNoise.DGAUSS:
        log_tail = -t * t / (2.0 * (rho + sites * share * share))
    else:
        total = sites * share  # Skellam variance of n shares; log-MGF total (cosh s - 1)

        def exponent(s: float) -> float:
            return s * s * rho / 2.0 + total * 2.0 * math.sinh(s / 2.0) ** 2 - s * t

        # The minimiser lies below t / (rho + total): sinh s >= s in the derivative.
        top = min(700.0, t / (rho + total))
        found = scipy.optimize.minimize_scalar(exponent, bounds=(0.0, top), method="bounded")
        log_tail = min(float(found.fun), exponent(top))
    return min(1.0, 2.0 * dim * math.exp(log_tail))


def _check_settings(
    noise: DistributedNoise,
    epsilon: float,
    delta: float,
    clip_norm: float,
    bits: int,
    beta: float,
    clip_target: float,
) -> None:
    if not isinstance(noise, DistributedNoise):
        raise ConfigError(f"dp.distributed.mechanism must be a DistributedNoise, got {noise!r}")
    check_positive("dp.distributed.epsilon", epsilon)
    check_positive("dp.distributed.clip_norm", clip_norm)
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"dp.distributed.bits must be in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if not 0 < check_positive("clip_target", clip_target) < 1:
        raise ConfigError(f"clip_target must be in (0, 1), got {clip_target!r}")
    rounded_l2_bound(scaled_norm=1.0, dim=1, beta=beta)  # validates beta
    rdp_to_epsilon((2.0,), np.zeros(1), delta)  # validates delta


_Trial = tuple[float, float, float, float]  # (Delta_2, Delta_1, share, clip probability)


def _largest(
    at: Callable[[float], _Trial], lo: float, hi: float, best: _Trial, target: float
) -> tuple[float, _Trial]:
    """Bisection on log gamma: ``lo`` meets the clipping target, ``hi`` does not (the needed
    range grows with gamma); the largest feasible gamma to 1e-4 and its trial."""
    while hi / lo > 1.0 + 1e-4:
        mid = math.sqrt(lo * hi)
        trial = at(mid)
        if trial[3] <= target:
            lo, best = mid, trial
        else:
            hi = mid
    return lo, best


@functools.lru_cache(maxsize=64, typed=True)  # typed: a bool is not taken for a 1
def plan_distributed(
    *,
    noise: DistributedNoise,
    epsilon: float,
    delta: float,
    rounds: int,
    sites: int,
    colluders: int,
    dropout_tolerance: float,
    bits: int,
    dim: int,
    clip_norm: float,
    beta: float = DEFAULT_BETA,
    clip_target: float = CLIP_TARGET,
) -> DistributedPlan:
    """The largest ``gamma`` whose noised sum stays in the ring (``clip_probability <=
    clip_target``), with the least honest-site noise meeting ``epsilon`` over ``rounds`` rounds.

    ``gamma`` is searched down to ``sqrt(d) / clip_norm`` (the clip norm spans ``sqrt(d)`` grid
    steps, so rounding at most doubles the sensitivity); below it the ring cannot hold a useful
    sum and ConfigError names ``dp.distributed.bits``. ConfigError also for any bad argument.
    Cached: a pure function of its arguments, its plan frozen (an error is not cached).
    """
    _check_settings(noise, epsilon, delta, clip_norm, bits, beta, clip_target)
    h = honest_noisers(sites=sites, colluders=colluders, dropout_tolerance=dropout_tolerance)
    d = padded_dim(dim)
    rounds = check_count("rounds", rounds)

    def at(gamma: float) -> _Trial:
        l2 = rounded_l2_bound(scaled_norm=gamma * clip_norm, dim=d, beta=beta)
        l1 = rounded_l1_bound(l2_bound=l2, dim=d)
        share = _share_for(noise, l2, l1, h=h, d=d, rounds=rounds, epsilon=epsilon, delta=delta)
        p = clip_probability(
            noise, scaled_norm=gamma * clip_norm, share=share, sites=sites, dim=d, bits=bits
        )
        return l2, l1, share, p

    lo, hi = math.sqrt(d) / clip_norm, (2.0 ** (bits - 1)) * math.sqrt(d) / clip_norm
    best = at(lo)
    if best[3] > clip_target:
        raise ConfigError(
            f"dp.distributed.bits={bits} cannot hold the noised sum of {sites} sites in "
            f"{d} coordinates at epsilon {epsilon} (chance {best[3]:.3g} of leaving the ring, "
            f"target {clip_target:g}, even at the coarsest useful grid): raise 'dp.distributed.bits'"
        )
    gamma, (l2, l1, share, p) = _largest(at, lo, hi, best, clip_target)
    # fmt: off
    return DistributedPlan(
        noise=noise, gamma=gamma, site_noise=share, sites=sites, noisers=h, dim=dim,
        padded_dim=d, clip_norm=float(clip_norm), beta=float(beta), bits=bits, l2_sensitivity=l2,
        l1_sensitivity=l1, clip_probability=p, rounds=rounds, delta=float(delta),
        epsilon=distributed_epsilon((_event(noise, l2, l1, h, d, share, rounds),), delta=delta),
    )
    # fmt: on


def clear_plan_cache() -> None:
    """Forget the cached plans (a benchmark's fresh process; a cached plan is never stale)."""
    plan_distributed.cache_clear()
