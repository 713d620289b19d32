"""Amplification by Poisson sampling for any mechanism known by its Renyi-DP curve.

Theory of operation. Each unit (a site) joins a round's sample independently with probability
``q``, and the observer does not learn the sample. Conditioned on the rest of the sample ``S``,
the round's output is a mixture, and what the mixture's two worlds look like depends on the
neighbouring relation the base mechanism's curve ``eps(alpha)`` holds for:

- *Add or remove one unit* (:attr:`~fedcore.privacy.relations.SiteRelation.ADD_REMOVE`): the worlds
  are ``P = M(S)`` and ``(1 - q) P + q Q`` with ``Q = M(S + x)``, and ``eps`` bounds both
  ``D_alpha(Q || P)`` and ``D_alpha(P || Q)``. Zhu and Wang, "Poisson Subsampled Renyi
  Differential Privacy" (ICML 2019), Thm 6 (the general upper bound, no assumption on ``M``):
  for every integer ``alpha >= 2`` both divergences of the subsampled pair are at most

      1/(alpha-1) log( (1-q)^(alpha-1) (alpha q - q + 1) + C(alpha,2) q^2 (1-q)^(alpha-2) e^eps(2)
                       + 3 sum_{l=3}^{alpha} C(alpha,l) q^l (1-q)^(alpha-l) e^((l-1) eps(l)) ).

  It is the same sum as their lower bound (Thm 5, exact for the Gaussian, which is what
  dp-accounting computes for it) with the factor 3 on the terms ``l >= 3``; hence tight up to
  ``log(3)/(alpha-1)`` and a factor ``1 + O(q)``. :func:`zhu_wang_bound` evaluates it in log space
  (log binomials from ``gammaln``, one ``logsumexp``), so large orders and small ``q`` neither
  overflow nor underflow.
- *Zero-out one unit* (:attr:`~fedcore.privacy.relations.SiteRelation.ZERO_OUT`, the relation of
  distributed DP's events: the site takes part and sends nothing, but still adds its noise share):
  the worlds are ``(1 - q) A + q B`` and ``(1 - q) A + q B'`` with ``A = M(S)``, ``B = M(S + x)``,
  ``B' = M(S + 0)``, and ``eps`` bounds only ``B`` against ``B'``. Thm 6 does not apply: its proof
  needs the unsampled world ``A`` to be one of the pair, and ``A`` (the sum without the site's
  noise share) is not within ``eps`` of ``B``; a test builds a pair where Thm 6's formula from the
  ``B``/``B'`` curve lies below the true divergence. What does hold is joint convexity of
  ``exp((alpha - 1) D_alpha(p || r)) = sum p^alpha r^(1-alpha)`` (a Csiszar f-divergence, ``t^alpha``
  convex, so jointly convex) applied to the pairs ``(A, A)`` and ``(B, B')``: both divergences are
  at most ``1/(alpha-1) log(1 - q + q e^((alpha-1) eps(alpha)))``
  (:func:`mixture_bound`), about ``q eps(alpha)`` for small losses: amplification linear in ``q``
  where Thm 6 gives ``q^2``.

Both bounds are capped by ``eps`` itself (joint convexity again: subsampling never hurts), and both
need the base curve to hold for *every* sample the protocol lets through (for distributed DP: the
honest noisers' count ``h`` for each sample size it unmasks).

Why this is written here. dp-accounting 0.6 (``dp_accounting.rdp.rdp_privacy_accountant``) amplifies
only a Gaussian inside ``PoissonSampledDpEvent`` (``_effective_gaussian_noise_multiplier`` refuses
any other sub-event; ``_compute_rdp_poisson_subsampled_gaussian`` is the exact Thm 5 sum for it),
and sampling without replacement only for the Gaussian; its Laplace, randomized-response, tree and
repeat-and-select curves are not subsampled. Opacus's RDP analysis is the subsampled Gaussian only.
autodp (the paper's code) is not among our pins; its ``rdp_acct.general_upperbound`` writes the same
Thm 6 as a difference of sums (and replaces ``eps(l)`` by ``eps(alpha)`` beyond ``l = 50``). So the
formula is coded here from the paper, and the tests check it independently: against the exact
subsampled Gaussian, and against exact divergences of finite mechanisms.

How loose. Per round, Thm 6's epsilon is within about 1.2x of the exact subsampled Gaussian's; but
the factor 3 costs up to ``log(3)/(alpha-1)`` per round at every order, which composition adds up:
after 100 rounds at noise 10 and rate 0.01 the epsilon is about 6x the exact one (the table of
``tests/privacy/test_subsampled_rdp.py``, run as a script). A mechanism with a tighter curve of its
own (Thm 8's conditions, or dp-accounting's Gaussian) should use that instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.special

from fedcore.errors import ConfigError
from fedcore.privacy.distributed import INTEGER_ORDERS, rdp_to_epsilon
from fedcore.privacy.events import RdpEvent
from fedcore.privacy.relations import SiteRelation

BaseCurve = Callable[[np.ndarray], np.ndarray]


def _rate(value: float, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"sampling_rate must be a number, got {value!r}")
    if not ((0 <= value <= 1) if allow_zero else (0 < value <= 1)):
        bounds = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(f"sampling_rate must be in {bounds}, got {value!r}")
    return float(value)


def integer_orders(orders: Iterable[float]) -> np.ndarray:
    """``orders`` as a float array, checked to be integers >= 2 (ConfigError otherwise)."""
    a = np.asarray(tuple(orders), dtype=np.float64).reshape(-1)
    if a.size == 0 or not np.all(np.isfinite(a)) or not np.all(a >= 2) or np.any(a != np.floor(a)):
        raise ConfigError(f"subsampled RDP is bounded at integer orders >= 2 only, got {orders!r}")
    return a


def _base_table(base: BaseCurve, top: int) -> np.ndarray:
    """The base curve at orders 2..top; element ``l - 2`` is ``eps(l)``."""
    table = np.asarray(base(np.arange(2, top + 1, dtype=np.float64)), dtype=np.float64)
    if table.shape != (top - 1,) or np.any(np.isnan(table)) or np.any(table < 0):
        raise ConfigError(f"a base RDP curve must be >= 0 at orders 2..{top}, got {table!r}")
    return table


def _zhu_wang_at(alpha: int, q: float, table: np.ndarray) -> float:
    """Thm 6 of Zhu and Wang (2019) at one integer order (module docstring), 0 < q < 1."""
    ell = np.arange(2, alpha + 1, dtype=np.float64)
    log_binom = (
        scipy.special.gammaln(alpha + 1.0)
        - scipy.special.gammaln(ell + 1.0)
        - scipy.special.gammaln(alpha - ell + 1.0)
    )
    terms = log_binom + ell * math.log(q) + (alpha - ell) * math.log1p(-q)
    terms = terms + (ell - 1.0) * table[: alpha - 1]  # e^((l-1) eps(l)); l = 2 gives e^eps(2)
    terms[1:] += math.log(3.0)  # the factor 3 on l >= 3
    first = (alpha - 1.0) * math.log1p(-q) + math.log1p((alpha - 1.0) * q)  # l = 0 and l = 1
    total = float(scipy.special.logsumexp(np.append(terms, first)))
    return max(0.0, total / (alpha - 1.0))


def zhu_wang_bound(base: BaseCurve, orders: Iterable[float], *, sampling_rate: float) -> np.ndarray:
    """RDP at each integer order of the Poisson-subsampled mechanism, add/remove relation.

    ``base(orders)`` is the base mechanism's RDP (both directions) at an array of integer orders
    >= 2. Zhu and Wang (ICML 2019) Thm 6, capped by the base curve. ``sampling_rate`` 1 gives
    the base curve exactly, 0 gives zeros. Raises ConfigError for orders that are not integers
    >= 2, a rate outside [0, 1], or a base curve that is negative or NaN.
    """
    a = integer_orders(orders)
    q = _rate(sampling_rate, allow_zero=True)
    table = _base_table(base, int(a.max()))
    own = table[a.astype(np.int64) - 2]
    if q == 1.0:
        return own.copy()
    if q == 0.0:
        return np.zeros_like(a)
    bound = np.array([_zhu_wang_at(int(alpha), q, table) for alpha in a])
    return np.minimum(bound, own)


def mixture_bound(base: BaseCurve, orders: Iterable[float], *, sampling_rate: float) -> np.ndarray:
    """RDP at each integer order of the Poisson-subsampled mechanism, zero-out relation.

    ``1/(alpha-1) log(1 - q + q e^((alpha-1) eps(alpha)))`` by joint convexity (module
    docstring), at most ``eps(alpha)``; the same checks and edge cases as :func:`zhu_wang_bound`.
    """
    a = integer_orders(orders)
    q = _rate(sampling_rate, allow_zero=True)
    own = np.asarray(base(a), dtype=np.float64)
    if own.shape != a.shape or np.any(np.isnan(own)) or np.any(own < 0):
        raise ConfigError(f"a base RDP curve must be >= 0 at the orders, got {own!r}")
    if q == 1.0:
        return own.copy()
    if q == 0.0:
        return np.zeros_like(a)
    with np.errstate(over="ignore"):
        log_mix = np.logaddexp(math.log1p(-q), math.log(q) + (a - 1.0) * own)
    return np.minimum(np.maximum(log_mix / (a - 1.0), 0.0), own)


def base_relation(event: RdpEvent) -> SiteRelation:
    """The relation ``event``'s curve holds for: its ``relation``, else add/remove (events.py)."""
    relation = getattr(event, "relation", SiteRelation.ADD_REMOVE)
    if not isinstance(relation, SiteRelation):
        raise ConfigError(f"{type(event).__name__}.relation is not a SiteRelation: {relation!r}")
    return relation


@dataclass(frozen=True, slots=True, kw_only=True)
class PoissonSubsampledRdpEvent(RdpEvent):
    """``base`` (all its ``count`` rounds) with each unit in each round's sample independently with
    probability ``sampling_rate``, the sample secret. RDP at integer orders only: Zhu and Wang Thm 6
    for an add/remove ``base``, joint convexity for a zero-out one (module docstring). It holds for
    the base's relation (:attr:`relation`). Raises ConfigError for a ``base`` that is not an
    :class:`RdpEvent` or a rate outside (0, 1]."""

    kind: ClassVar[str] = "poisson_subsampled_rdp"
    integer_orders: ClassVar[bool] = True
    event_fields: ClassVar[tuple[str, ...]] = ("base",)  # decoded as events (events.py)
    base: RdpEvent
    sampling_rate: float

    def __post_init__(self) -> None:
        if not isinstance(self.base, RdpEvent):
            raise ConfigError(f"PoissonSubsampledRdpEvent needs an RdpEvent, got {self.base!r}")
        _rate(self.sampling_rate, allow_zero=False)
        base_relation(self.base)

    @property
    def relation(self) -> SiteRelation:
        """The neighbouring relation of the bound: the base's."""
        return base_relation(self.base)

    def rdp_curve(self, orders: Iterable[float] = INTEGER_ORDERS) -> np.ndarray:
        """RDP of all the base's rounds, each subsampled, at each integer order >= 2."""
        count = getattr(self.base, "count", 1)
        one = dataclasses.replace(self.base, count=1) if count != 1 else self.base  # type: ignore[call-arg]

        def curve(a: np.ndarray) -> np.ndarray:
            return np.asarray(one.rdp_curve(tuple(float(x) for x in a)), dtype=np.float64)

        bound = zhu_wang_bound if self.relation is SiteRelation.ADD_REMOVE else mixture_bound
        return count * bound(curve, orders, sampling_rate=self.sampling_rate)


# The kinds a ledger file may hold (fedcore.privacy.events loads them through this).
EVENTS: dict[str, type[RdpEvent]] = {PoissonSubsampledRdpEvent.kind: PoissonSubsampledRdpEvent}


def observers_epsilon(events: Iterable[RdpEvent], *, sampling_rate: float, delta: float) -> float:
    """The epsilon at ``delta`` against observers of the released models who do not know the
    sample, for ``events`` (RDP events, each round Poisson-subsampled at ``sampling_rate``)
    composed: each wrapped in :class:`PoissonSubsampledRdpEvent`, the curves added over
    :data:`~fedcore.privacy.distributed.INTEGER_ORDERS`, converted by
    :func:`~fedcore.privacy.distributed.rdp_to_epsilon`. For distributed DP's zero-out events this
    is the joint-convexity bound (module docstring). 0 for no events; ConfigError for an event
    that is not an RdpEvent or a rate outside (0, 1]."""
    history = tuple(events)
    if not history:
        return 0.0
    orders = np.asarray(INTEGER_ORDERS, dtype=np.float64)
    total = np.zeros(orders.size)
    for event in history:
        total += PoissonSubsampledRdpEvent(base=event, sampling_rate=sampling_rate).rdp_curve(
            orders
        )
    return rdp_to_epsilon(orders, total, delta)
