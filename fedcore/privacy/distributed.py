"""Accounting for distributed DP under secure aggregation: DDGauss and Skellam, in RDP.

Theory of operation. Each site clips its update to L2 norm ``c``, rotates it (randomized
Hadamard, norm-preserving), scales it by ``gamma`` (grid step ``1 / gamma``), rounds it to the
integers with conditional randomized rounding, adds discrete noise and reduces it modulo 2**bits
(:mod:`fedcore.mechanisms.distributed_encoding`). Secure aggregation reveals only the sum, so the
server sees ``sum_i v_i + sum_i N_i`` (mod 2**bits): a discrete additive-noise mechanism whose
noise is the sum of the honest sites' shares. Everything here is in grid units (integers).

Sensitivity (KLS21 Sec. 4; the bound is Prop. 22 of the arXiv version, 2102.06387). The rotation is
orthonormal, so the rotated, scaled update has norm at most ``C = gamma c``. Stochastic rounding
adds an error of norm below ``sqrt(d)``; conditional rounding retries it until the rounded vector's
norm is at most

    Delta_2 = min( sqrt(C^2 + d/4 + sqrt(2 ln(1/beta)) (C + sqrt(d)/2)),  C + sqrt(d) ),

which a single try meets with probability at least ``1 - beta``; the site checks the bound on the
integers it sends (:func:`rounded_l2_bound`), so it holds whatever the float error of the rotation.
For integer vectors ``||v||_1 <= min(sqrt(d) ||v||_2, ||v||_2^2)`` gives ``Delta_1``. ``d`` is the
padded dimension (a power of two). The neighbouring relation is *zero-out one whole site*
(:attr:`~fedcore.privacy.relations.SiteRelation.ZERO_OUT`): the site takes part and sends ``0``
instead of ``v`` but still adds its noise share, so both worlds hold the same noise; under
add/remove the absent site's noise share would be missing too, which no shift bound covers.

DDGauss (KLS21, Thm 1 and Prop 14). The sum of ``h`` independent ``N_Z(0, sigma^2)`` vectors is
close to ``N_Z(0, h sigma^2)``: with ``tau = 10 sum_{k=1}^{h-1} exp(-2 pi^2 sigma^2 k/(k+1))``
(``sigma >= 1/2``), for every real ``alpha > 1``,

    eps(alpha) = min( alpha D2^2/(2 h sigma^2) + tau d,
                      alpha/2 (D2^2/(h sigma^2) + 2 D1 tau/(sqrt(h) sigma) + tau^2 d),
                      alpha/2 (D2/(sqrt(h) sigma) + sqrt(d) tau)^2 ).

Skellam (AKL21, Thm 3.5 / Cor. 3.6). Each coordinate of the noise is Poisson(mu/2) - Poisson(mu/2)
(variance ``mu``); a sum of Skellams is Skellam, so ``h`` shares of variance ``mu`` give variance
``h mu`` exactly. For every integer ``alpha > 1``, with ``M = h mu``,

    eps(alpha) = alpha D2^2/(2M) + min( ((2 alpha - 1) D2^2 + 6 D1)/(4 M^2),  3 D1/(2M) ).

Who adds the noise. Of ``n`` sampled sites at most ``floor(tolerance n)`` may drop (the protocol
refuses to unmask below :func:`min_survivors`), and up to ``colluders`` survivors may add nothing
(or tell the server their share). The honest sites' noise alone must meet the target, so each site
adds ``1 / h`` of it with ``h = min_survivors - colluders`` (:func:`honest_noisers`). More honest
noisers than ``h`` only add independent noise (post-processing): the bound for ``h`` still holds.

Conversion and composition. RDP adds over rounds; ``(epsilon, delta)`` comes from the curve by
Canonne, Kamath and Steinke 2020, Prop 12 (``eps = r(a) + log(1 - 1/a) - (log delta + log a) /
(a - 1)``, minimised over the orders; :func:`rdp_to_epsilon`). The epsilon is *against the server*:
it knows the sample, so no amplification by sampling is claimed. The amplified epsilon against
observers of the released models (sample secret) is left to the mechanism's wiring: it would take
the per-round curve through the Poisson-subsampled RDP bound of Zhu and Wang (ICML 2019, Thm 6,
integer orders), with the caveat that ``h`` must then hold for every sample size the protocol lets
through; it is not computed here.

The choice of ``gamma`` and of the noise share for a federation (and the modular-clipping
bound behind it) is :mod:`fedcore.privacy.distributed_plan`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import numpy as np

from fedcore.errors import ConfigError
from fedcore.privacy.events import RdpEvent
from fedcore.privacy.relations import SiteRelation


class DistributedNoise(enum.Enum):
    """Which discrete noise the sites add (``dp.distributed.mechanism``)."""

    DGAUSS = "dgauss"
    SKELLAM = "skellam"


# Orders: every real alpha > 1 is valid for DDGauss, integers only for Skellam (AKL21).
INTEGER_ORDERS: tuple[int, ...] = tuple(
    [*range(2, 128), *range(128, 512, 4), *range(512, 4096, 32), *range(4096, 16385, 256)]
)
REAL_ORDERS: tuple[float, ...] = tuple(
    sorted({round(1.0 + 0.02 * i, 2) for i in range(1, 50)} | set(map(float, INTEGER_ORDERS)))
)


def check_positive(name: str, value: float) -> float:
    """``value`` as a float; ConfigError naming ``name`` unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def check_count(name: str, value: int, *, least: int = 1) -> int:
    """``value`` as an int; ConfigError naming ``name`` unless it is an integer >= ``least``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
        raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)


def padded_dim(dim: int) -> int:
    """The smallest power of two at least ``dim`` (the Hadamard transform's length)."""
    return 1 << (check_count("dim", dim) - 1).bit_length()


def rounded_l2_bound(*, scaled_norm: float, dim: int, beta: float) -> float:
    """``Delta_2`` of conditional rounding (module docstring) for a vector of norm at most
    ``scaled_norm`` (grid units) in ``dim`` coordinates; ``beta = 0``: the unconditional bound."""
    c = check_positive("scaled_norm", scaled_norm)
    d = check_count("dim", dim)
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 1:
        raise ConfigError(f"dp.distributed.beta must be in [0, 1), got {beta!r}")
    plain = c + math.sqrt(d)
    if beta == 0:
        return plain
    squared = c * c + d / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + math.sqrt(d) / 2.0)
    return min(plain, math.sqrt(squared))


def rounded_l1_bound(*, l2_bound: float, dim: int) -> float:
    """``Delta_1 = min(sqrt(d) Delta_2, Delta_2^2)``: for integers, ``|v_i| <= v_i^2``."""
    return l2_bound * min(math.sqrt(check_count("dim", dim)), l2_bound)


def min_survivors(*, sites: int, dropout_tolerance: float) -> int:
    """The fewest survivors the protocol may unmask with: ``n - floor(tolerance * n)``.

    The one home of this count: the unmask floor and the noise target both use it. The tolerance
    is read as the decimal it prints as, so 0.3 of 10 sites allows 3 dropouts (its binary value,
    0.2999..., would allow 2).
    """
    n = check_count("sites", sites)
    t = dropout_tolerance
    if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < 1:
        raise ConfigError(f"dp.distributed.dropout_tolerance must be in [0, 1), got {t!r}")
    return n - math.floor(Fraction(repr(float(t))) * n)


def honest_noisers(*, sites: int, colluders: int, dropout_tolerance: float) -> int:
    """``h = min_survivors - colluders``: the honest survivors whose noise alone meets the target.

    Raises ConfigError when ``h < 1`` (no honest site is sure to survive).
    """
    c = check_count("dp.distributed.colluders", colluders, least=0)
    h = min_survivors(sites=sites, dropout_tolerance=dropout_tolerance) - c
    if h < 1:
        raise ConfigError(
            f"dp.distributed.colluders={c} with dropout_tolerance={dropout_tolerance} leaves no "
            f"honest survivor among {sites} sites to add the noise"
        )
    return h


def _check_event(event: _DistributedEvent) -> None:
    check_positive("l2_sensitivity", event.l2_sensitivity)
    check_positive("l1_sensitivity", event.l1_sensitivity)
    check_count("noisers", event.noisers)
    check_count("dim", event.dim)
    check_count("count", event.count)


@dataclass(frozen=True, slots=True, kw_only=True)
class _DistributedEvent(RdpEvent):
    """Fields shared by both events: sensitivities in grid units, ``h`` noisers, padded ``dim``."""

    relation: ClassVar[SiteRelation] = SiteRelation.ZERO_OUT
    l2_sensitivity: float
    l1_sensitivity: float
    noisers: int
    dim: int
    count: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class DistributedDiscreteGaussianEvent(_DistributedEvent):
    """``count`` rounds of the sum of ``noisers`` shares of ``N_Z(0, sigma^2)`` per coordinate
    (``sigma`` in grid units, one share per honest site) added to an integer vector of sensitivity
    ``l2_sensitivity`` (``l1_sensitivity``) in ``dim`` coordinates (KLS21, Thm 1 / Prop 14)."""

    kind: ClassVar[str] = "distributed_discrete_gaussian"
    sigma: float

    def __post_init__(self) -> None:
        _check_event(self)
        if not (check_positive("sigma", self.sigma) >= 0.5):
            raise ConfigError(f"KLS21 Thm 1 needs a share's sigma >= 1/2, got {self.sigma!r}")

    @property
    def tau(self) -> float:
        """``10 sum_{k=1}^{h-1} exp(-2 pi^2 sigma^2 k / (k + 1))`` (KLS21 Thm 1)."""
        k = np.arange(1, self.noisers, dtype=np.float64)
        return float(10.0 * np.sum(np.exp(-2.0 * math.pi**2 * self.sigma**2 * k / (k + 1.0))))

    def rdp_curve(self, orders: np.ndarray | tuple[float, ...] = REAL_ORDERS) -> np.ndarray:
        """RDP of the ``count`` rounds at each order (> 1); RDP adds over rounds."""
        a = _orders(orders, integer=False)
        tau, d = self.tau, float(self.dim)
        scale = math.sqrt(self.noisers) * self.sigma  # the sum's sigma
        l2, l1 = self.l2_sensitivity / scale, self.l1_sensitivity / scale
        first = a * l2 * l2 / 2.0 + tau * d
        second = a / 2.0 * (l2 * l2 + 2.0 * l1 * tau + tau * tau * d)
        third = a / 2.0 * (l2 + math.sqrt(d) * tau) ** 2
        return self.count * np.minimum(np.minimum(first, second), third)

    def rdp(self, order: float) -> float:
        """RDP of the ``count`` rounds at ``order`` (a real > 1)."""
        return float(self.rdp_curve((order,))[0])


@dataclass(frozen=True, slots=True, kw_only=True)
class SkellamEvent(_DistributedEvent):
    """``count`` rounds of the sum of ``noisers`` Skellam shares of variance ``mu`` per
    coordinate (grid units; each share Poisson(mu/2) - Poisson(mu/2)) added to an integer vector
    of sensitivities ``l2_sensitivity``, ``l1_sensitivity`` (AKL21, Thm 3.5)."""

    kind: ClassVar[str] = "skellam"
    integer_orders: ClassVar[bool] = True
    mu: float

    def __post_init__(self) -> None:
        _check_event(self)
        check_positive("mu", self.mu)

    def rdp_curve(self, orders: np.ndarray | tuple[float, ...] = INTEGER_ORDERS) -> np.ndarray:
        """RDP of the ``count`` rounds at each order (integers > 1 only: ConfigError otherwise)."""
        a = _orders(orders, integer=True)
        var = self.noisers * self.mu
        l2sq, l1 = self.l2_sensitivity**2, self.l1_sensitivity
        extra = np.minimum(((2.0 * a - 1.0) * l2sq + 6.0 * l1) / (4.0 * var * var), 1.5 * l1 / var)
        return self.count * (a * l2sq / (2.0 * var) + extra)

    def rdp(self, order: int) -> float:
        """RDP of the ``count`` rounds at the integer ``order`` > 1."""
        return float(self.rdp_curve((order,))[0])


DistributedEvent = DistributedDiscreteGaussianEvent | SkellamEvent
# The kinds a ledger file may hold (fedcore.privacy.events loads them through this).
EVENTS: dict[str, type[RdpEvent]] = {
    cls.kind: cls for cls in (DistributedDiscreteGaussianEvent, SkellamEvent)
}


def _orders(orders: np.ndarray | tuple[float, ...], *, integer: bool) -> np.ndarray:
    a = np.asarray(orders, dtype=np.float64).reshape(-1)
    if a.size == 0 or not np.all(np.isfinite(a)) or not np.all(a > 1):
        raise ConfigError(f"RDP orders must be finite and > 1, got {orders!r}")
    if integer and not np.all(a == np.floor(a)):
        raise ConfigError(f"the Skellam bound (AKL21) holds at integer orders only, got {orders!r}")
    return a


def rdp_to_epsilon(orders: np.ndarray | tuple[float, ...], rdp: np.ndarray, delta: float) -> float:
    """``min_a r(a) + log(1 - 1/a) - (log delta + log a) / (a - 1)`` (CKS20 Prop 12), >= 0."""
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    a = np.asarray(orders, dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64)
    eps = r + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    return max(0.0, float(np.min(eps)))


def distributed_epsilon(events: tuple[DistributedEvent, ...], *, delta: float) -> float:
    """The epsilon at ``delta`` of ``events`` composed (RDP adds), against the server (no
    amplification). Over integer orders when a Skellam event is among them."""
    if not events:
        return 0.0
    integer = any(isinstance(e, SkellamEvent) for e in events)
    orders = np.asarray(INTEGER_ORDERS if integer else REAL_ORDERS, dtype=np.float64)
    total = np.zeros(orders.size)
    for event in events:
        total += event.rdp_curve(orders)
    return rdp_to_epsilon(orders, total, delta)
