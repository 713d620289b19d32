"""Epsilon for a history of privacy events, and the noise that meets a target epsilon.

Which accountant, and why. fedcore's default is the privacy loss distribution (PLD) accountant of
Google's ``dp-accounting`` (Koskela, Jalko and Honkela 2020; Doroshenko, Ghazi, Kamath, Kumar and
Manurangsi, "Connect the Dots", PETS 2022), used with its *pessimistic* discretisation: every
privacy loss is rounded up to the grid and the truncated tail mass is added to delta, so the
epsilon it reports is an upper bound on the true epsilon of the composed mechanism, and a tight
one (to about ``value_discretization_interval`` per composition). We considered:

- Opacus RDP: its orders stop at 63. Small epsilons need large orders (the optimal order grows
  like ``sigma * sqrt(2 log(1/delta))``), so it overstates them; and any RDP-to-(eps, delta)
  conversion is loose by itself (10 to 25 per cent on DP-SGD workloads).
- dp-accounting RDP: available here as ``AccountantKind.RDP`` with a wider order grid, for
  comparison with published RDP figures. Version 0.6 bounds fractional orders loosely; a loose
  bound is still an upper bound, and the minimum over integer and fractional orders is taken.
- Opacus PRV (Gopi, Lee and Wutschitz 2021): as tight as PLD, but it only knows the
  Poisson-subsampled Gaussian and its error bound is tolerance-driven; we use it in the tests as
  an independent second library instead.

Figures (TF Privacy's MNIST example: q = 256/60000, sigma = 1.1, 14063 steps, delta = 1e-5):
the older RDP conversion of TF Privacy's ``compute_dp_sgd_privacy`` gives 3.01; dp-accounting RDP
2.60; Opacus PRV 2.39; fedcore's PLD 2.38 (the optimistic PLD, a lower bound, is just below).

How events are accounted. Each event is lowered to a multiset of *mechanisms*: the Gaussian
mechanism with a noise multiplier, or the Poisson-subsampled Gaussian with a sampling rate and a
noise multiplier, each with a count (see :func:`canonical_mechanisms`). Equal mechanisms are
merged by adding their counts, so charging an event ``k`` times is the same computation as
charging it once with count ``k``. A Poisson sampling rate of 1 is the plain Gaussian. All plain
Gaussians compose exactly into one (``T`` with noise ``sigma`` into one with ``sigma / sqrt(T)``;
Dong, Roth and Su 2019, Cor. 3.3); when nothing else is in the history, PLD mode gives that
Gaussian's exact epsilon (Balle and Wang 2018, Thm 8), rounded up, instead of a slow fine grid.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Protocol

import dp_accounting
import numpy as np
import scipy.stats
from dp_accounting import gaussian_mechanism
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedcore.errors import ConfigError
from fedcore.privacy.events import (
    ComposedEvent,
    FixedSizeSubsampledGaussian,
    GaussianEvent,
    NonPrivate,
    NoPrivacyLoss,
    PoissonSubsampledGaussian,
    PrivacyEvent,
    RdpEvent,
    RevealedWithProbability,
    SelfComposedEvent,
    UnsupportedEventError,
)


class AccountantKind(enum.Enum):
    """The accountant that turns a history of events into epsilon."""

    PLD = "pld"
    RDP = "rdp"


DEFAULT_ACCOUNTANT = AccountantKind.PLD

# The PLD grid: losses are rounded up to multiples of this (pessimistic estimate).
PLD_DISCRETIZATION = 1e-4
# dp-accounting's default orders (1.1 .. 10.9 by 0.1, 11 .. 63, 128 .. 1024) plus integer orders
# between 64 and 1024 and up to 2048, so that small epsilons (whose best order is large) are not
# overstated. The cost of an integer order grows with the order, so the grid thins out.
RDP_ORDERS: tuple[float, ...] = tuple(
    sorted(
        set(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
        | set(range(64, 128, 8))
        | {160, 192, 320, 384, 768, 1536, 2048}
    )
)

# A mechanism after lowering: ("gaussian", z), ("poisson_gaussian", q, z) or ("non_private",).
Mechanism = tuple[str | float, ...]
Mechanisms = tuple[tuple[Mechanism, int], ...]


def canonical_mechanisms(events: PrivacyEvent | Iterable[PrivacyEvent]) -> Mechanisms:
    """Lower ``events`` to sorted (mechanism, count) pairs with equal mechanisms merged.

    Raises :class:`UnsupportedEventError` for an event type with no lowering.
    """
    counts: Counter[Mechanism] = Counter()
    items = (events,) if isinstance(events, PrivacyEvent) else tuple(events)
    for event in items:
        _lower(event, 1, counts)
    return tuple(sorted(counts.items(), key=lambda kv: repr(kv[0])))


def _lower(event: PrivacyEvent, times: int, out: Counter[Mechanism]) -> None:
    # The one place where an event type meets its analysis: a new event (discrete Gaussian,
    # Skellam) needs a branch here, or it is refused below.
    if isinstance(event, NoPrivacyLoss):
        return
    if isinstance(event, NonPrivate):
        out[("non_private",)] += times
    elif isinstance(event, GaussianEvent):
        out[("gaussian", float(event.noise_multiplier))] += times * event.count
    elif isinstance(event, PoissonSubsampledGaussian):
        if event.sampling_rate == 1:
            out[("gaussian", float(event.noise_multiplier))] += times * event.count
        else:
            key = ("poisson_gaussian", float(event.sampling_rate), float(event.noise_multiplier))
            out[key] += times * event.count
    elif isinstance(event, FixedSizeSubsampledGaussian):
        # Sensitivity 2C under add/remove, no amplification (see the class docstring).
        out[("gaussian", float(event.noise_multiplier) / 2.0)] += times * event.count
    elif isinstance(event, RevealedWithProbability):
        if event.probability > 0:
            out[("revealed", float(event.probability))] += times * event.count
    elif isinstance(event, RdpEvent):  # composed in RDP (_rdp_epsilon), one curve per count
        count = getattr(event, "count", 1)
        out[("rdp", dataclasses.replace(event, count=1) if count != 1 else event)] += times * count
    elif isinstance(event, SelfComposedEvent):
        _lower(event.event, times * event.count, out)
    elif isinstance(event, ComposedEvent):
        for inner in event.events:
            _lower(inner, times, out)
    else:
        raise UnsupportedEventError(
            f"no privacy analysis for event type {type(event).__name__}; add a lowering in "
            "fedcore.privacy.accountant._lower before charging it"
        )


class Accountant(Protocol):
    """Anything that bounds epsilon for a multiset of mechanisms; must never under-report."""

    kind: AccountantKind

    def epsilon(self, mechanisms: Mechanisms, *, delta: float) -> float: ...


def _to_dp_event(mechanism: Mechanism) -> dp_accounting.DpEvent:
    if mechanism[0] == "gaussian":
        return dp_accounting.GaussianDpEvent(float(mechanism[1]))
    if mechanism[0] == "poisson_gaussian":
        return dp_accounting.PoissonSampledDpEvent(
            float(mechanism[1]), dp_accounting.GaussianDpEvent(float(mechanism[2]))
        )
    raise UnsupportedEventError(f"no dp-accounting event for mechanism {mechanism!r}")


class _DpAccountingAccountant:
    """Adapter over a dp-accounting accountant; add/remove-one adjacency throughout."""

    def __init__(self, kind: AccountantKind, *, discretization: float = PLD_DISCRETIZATION):
        self.kind = kind
        self._discretization = discretization

    def _fresh(self) -> dp_accounting.PrivacyAccountant:
        if self.kind is AccountantKind.PLD:
            return pld_privacy_accountant.PLDAccountant(
                value_discretization_interval=self._discretization
            )
        return rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ORDERS))

    def epsilon(self, mechanisms: Mechanisms, *, delta: float) -> float:
        if any(m[0] == "non_private" for m, _ in mechanisms):
            return math.inf
        mechanisms, delta = split_revealed(mechanisms, delta)
        if delta <= 0:
            return math.inf
        if not mechanisms:
            return 0.0
        if any(m[0] == "rdp" for m, _ in mechanisms):
            return _rdp_epsilon(mechanisms, delta=delta)
        # Gaussians without sampling compose exactly into one: noise (sum_i c_i / z_i^2)^-1/2
        # (Dong, Roth and Su 2019, Cor. 3.3). Its epsilon has a closed form (Balle and Wang
        # 2018, Thm 8), which is exact where a PLD grid is slow for small noise.
        gaussians = [(float(m[1]), c) for m, c in mechanisms if m[0] == "gaussian"]
        others = [(m, c) for m, c in mechanisms if m[0] != "gaussian"]
        leaves: list[tuple[Mechanism, int]] = list(others)
        if gaussians:
            merged = sum(c / z**2 for z, c in gaussians) ** -0.5
            if not others and self.kind is AccountantKind.PLD:
                return exact_gaussian_epsilon(merged, delta)
            leaves.append((("gaussian", merged), 1))
        acct = self._fresh()
        acct.compose(
            dp_accounting.ComposedDpEvent(
                [dp_accounting.SelfComposedDpEvent(_to_dp_event(m), c) for m, c in leaves]
            )
        )
        return max(0.0, float(acct.get_epsilon(delta)))


def _rdp_epsilon(mechanisms: Mechanisms, *, delta: float) -> float:
    """Epsilon of a history holding an :class:`RdpEvent`, composed in RDP whatever the ledger's
    accountant (PLD has no such events): each mechanism's RDP curve on one grid of orders (integer
    orders only when some event's bound holds only there), summed, converted by dp-accounting's
    ``compute_epsilon`` (Canonne, Kamath and Steinke 2020, Prop 12). Gaussian: ``a / (2 z^2)``
    (Mironov 2017, Prop 7); Poisson-subsampled Gaussian: dp-accounting's bound (Mironov, Talwar
    and Zhang 2019), the same function its RdpAccountant composes."""
    integer = any(m[0] == "rdp" and m[1].integer_orders for m, _ in mechanisms)
    orders = tuple(a for a in RDP_ORDERS if a > 1 and (not integer or a == int(a)))
    total = np.zeros(len(orders))
    for mechanism, count in mechanisms:
        if mechanism[0] == "rdp":
            curve = mechanism[1].rdp_curve(orders)
        elif mechanism[0] == "gaussian":
            curve = np.asarray(orders) / (2.0 * float(mechanism[1]) ** 2)
        elif mechanism[0] == "poisson_gaussian":
            q, z = float(mechanism[1]), float(mechanism[2])
            curve = rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(q, z, orders)
        else:
            raise UnsupportedEventError(f"no RDP curve for mechanism {mechanism!r}")
        total = total + count * np.asarray(curve, dtype=np.float64)
    eps, _ = rdp_privacy_accountant.compute_epsilon(orders, total, delta)
    return max(0.0, float(eps))


def split_revealed(mechanisms: Mechanisms, delta: float) -> tuple[Mechanisms, float]:
    """The mechanisms without their reveal probabilities, and the ``delta`` left for them:
    ``delta - (1 - prod (1 - p)^count)`` (:class:`~fedcore.privacy.events.RevealedWithProbability`;
    zero or less when the reveals alone use it up)."""
    kept = tuple((m, c) for m, c in mechanisms if m[0] != "revealed")
    log_kept = sum(c * math.log1p(-float(m[1])) for m, c in mechanisms if m[0] == "revealed")
    return kept, delta + math.expm1(log_kept)


def _gaussian_log_delta(sigma: float, eps: float) -> float:
    """log delta(eps) of the Gaussian mechanism, sensitivity 1 (Balle and Wang 2018, eq. 6)."""
    a = 1.0 / (2.0 * sigma)
    x = float(scipy.stats.norm.logcdf(a - eps * sigma))
    y = eps + float(scipy.stats.norm.logcdf(-a - eps * sigma))
    return x + math.log1p(-math.exp(y - x)) if y < x else -math.inf


def exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of the Gaussian mechanism with noise ``sigma`` at ``delta``, rounded up.

    dp-accounting's root finder returns a value within 1e-12 of the root, on either side; it is
    nudged up until delta(eps) <= delta holds, so the result is never below the true epsilon.
    """
    eps = float(gaussian_mechanism.get_epsilon_gaussian(sigma, delta))
    log_delta, step = math.log(delta), 1e-12
    while _gaussian_log_delta(sigma, eps) > log_delta:
        eps += step
        step *= 2
    return eps


def get_accountant(kind: AccountantKind | str) -> Accountant:
    """The accountant named ``kind`` ("pld" or "rdp"); :class:`ConfigError` for any other."""
    return _DpAccountingAccountant(parse_accountant(kind))


def parse_accountant(kind: AccountantKind | str) -> AccountantKind:
    """``kind`` as an :class:`AccountantKind`; :class:`ConfigError` naming the value if unknown."""
    if isinstance(kind, AccountantKind):
        return kind
    try:
        return AccountantKind(str(kind).lower())
    except ValueError:
        known = ", ".join(k.value for k in AccountantKind)
        raise ConfigError(f"unknown accountant {kind!r}: expected one of {known}") from None


def check_delta(delta: float) -> float:
    if not isinstance(delta, int | float) or not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


@functools.lru_cache(maxsize=4096)
def _cached_epsilon(
    mechanisms: Mechanisms, delta: float, kind: AccountantKind, grid: float
) -> float:
    return _DpAccountingAccountant(kind, discretization=grid).epsilon(mechanisms, delta=delta)


def epsilon(
    events: PrivacyEvent | Iterable[PrivacyEvent],
    *,
    delta: float,
    accountant: AccountantKind | str = DEFAULT_ACCOUNTANT,
) -> float:
    """An upper bound on the epsilon of ``events`` composed, at ``delta``.

    Raises :class:`ConfigError` for a bad ``delta`` or accountant name, and
    :class:`UnsupportedEventError` for an event with no analysis.
    """
    return _cached_epsilon(
        canonical_mechanisms(events),
        check_delta(delta),
        parse_accountant(accountant),
        PLD_DISCRETIZATION,
    )


# The grid of the quick lower bound: ten times coarser than PLD_DISCRETIZATION (a subsampled
# Gaussian with small noise takes seconds on the fine grid, tenths on this one).
LOWER_BOUND_DISCRETIZATION = 1e-3


def epsilon_lower_bound(events: PrivacyEvent | Iterable[PrivacyEvent], *, delta: float) -> float:
    """A quick lower bound on the true epsilon of ``events`` composed, at ``delta``.

    dp-accounting's *optimistic* PLD (Koskela et al. 2020; Doroshenko et al. 2022): every privacy
    loss is rounded down to a coarse grid and truncated tail mass is moved to a smaller loss or
    dropped, so its delta(eps) never exceeds the true one and the epsilon it gives never exceeds the
    true epsilon, which never exceeds what either accountant reports (:func:`epsilon`: pessimistic
    PLD or RDP, both upper bounds). So a budget below this bound is a budget :func:`epsilon` refuses
    too: it is for refusing early, never for accepting. Add/remove-one adjacency, as
    :func:`epsilon`. Raises as :func:`epsilon`.
    """
    from dp_accounting.pld import privacy_loss_distribution as pld

    mechanisms = canonical_mechanisms(events)
    check_delta(delta)
    if any(m[0] == "non_private" for m, _ in mechanisms):
        return math.inf
    # A lower bound may leave events out (the reveals, the RDP-only events): the rest alone at the
    # whole delta is no more private than everything.
    mechanisms = tuple((m, c) for m, c in mechanisms if m[0] not in ("revealed", "rdp"))
    if not mechanisms:
        return 0.0
    composed = None
    for mechanism, count in mechanisms:
        sampling = float(mechanism[1]) if mechanism[0] == "poisson_gaussian" else 1.0
        single = pld.from_gaussian_mechanism(
            float(mechanism[-1]),
            sampling_prob=sampling,
            pessimistic_estimate=False,
            use_connect_dots=False,  # connect-the-dots is pessimistic only
            value_discretization_interval=LOWER_BOUND_DISCRETIZATION,
            neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        ).self_compose(count)
        composed = single if composed is None else composed.compose(single)
    assert composed is not None
    return max(0.0, float(composed.get_epsilon_for_delta(delta)))


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantKind | str = DEFAULT_ACCOUNTANT,
    rtol: float = 1e-3,
) -> float:
    """The smallest noise multiplier (to relative tolerance ``rtol``) whose ``steps`` steps of the
    Poisson-subsampled Gaussian at ``sample_rate`` stay within ``target_epsilon`` at ``delta``.

    The result ``z`` always meets the target by the accountant that will charge it, and
    ``z / (1 + rtol)`` does not. Bisection on log(z): epsilon falls as z grows. For PLD, a coarse
    grid (an upper bound on the fine one) brackets the answer first, then the fine grid decides.
    Raises :class:`ConfigError` for out-of-range inputs or an unreachable target.
    """
    if not isinstance(target_epsilon, int | float) or not (
        math.isfinite(target_epsilon) and target_epsilon > 0
    ):
        raise ConfigError(f"target epsilon must be finite and > 0, got {target_epsilon!r}")
    if not 0 < rtol < 0.5:
        raise ConfigError(f"rtol must be in (0, 0.5), got {rtol!r}")
    check_delta(delta)
    kind = parse_accountant(accountant)
    # Validates sample_rate and steps with the event's own checks.
    PoissonSubsampledGaussian(sampling_rate=sample_rate, noise_multiplier=1.0, count=steps)

    def eps_fn(grid: float) -> Callable[[float], float]:
        def eps(z: float) -> float:
            event = PoissonSubsampledGaussian(
                sampling_rate=sample_rate, noise_multiplier=z, count=steps
            )
            return _cached_epsilon(canonical_mechanisms(event), float(delta), kind, grid)

        return eps

    fine = eps_fn(PLD_DISCRETIZATION)
    if kind is AccountantKind.PLD:
        # A coarse grid (ten times faster) brackets the answer to 1 per cent; the fine grid, which
        # the ledger charges with, then decides. The two rarely differ by more than the bracket.
        coarse = eps_fn(10 * PLD_DISCRETIZATION)
        lo, hi = _solve(coarse, target_epsilon, *_bracket(coarse, target_epsilon, 1.0), 1e-2)
        if fine(hi) > target_epsilon:
            lo, hi = _bracket(fine, target_epsilon, hi)
        else:
            step = 1e-2
            while fine(lo) <= target_epsilon and lo > _Z_MIN:
                hi, lo, step = lo, lo / (1 + step), 2 * step
    else:
        lo, hi = _bracket(fine, target_epsilon, 1.0)
    return _solve(fine, target_epsilon, lo, hi, rtol)[1]


_Z_MIN, _Z_MAX = 1e-3, 1e4


def _bracket(eps: Callable[[float], float], target: float, start: float) -> tuple[float, float]:
    """(lo, hi) with eps(hi) <= target < eps(lo), by doubling or halving from ``start``."""
    hi = start
    while eps(hi) > target:
        hi *= 2
        if hi > _Z_MAX:
            raise ConfigError(f"no noise multiplier up to {_Z_MAX:g} meets epsilon {target}")
    lo = hi / 2
    while eps(lo) <= target and lo > _Z_MIN:
        hi, lo = lo, lo / 2
    return lo, hi


def _solve(
    eps: Callable[[float], float], target: float, lo: float, hi: float, rtol: float
) -> tuple[float, float]:
    """Shrink the bracket (lo, hi) until hi / lo - 1 <= rtol, keeping eps(hi) <= target.

    Regula falsi on g(z) = log(eps(z) / target) against log(z), with the Illinois modification
    (Dowell and Jarratt 1971) so that both ends move; a geometric midpoint where g is infinite.
    """

    def g(z: float) -> float:
        e = eps(z)
        return math.inf if e == math.inf else math.log(max(e, 1e-300) / target)

    g_lo, g_hi, stale = g(lo), g(hi), 0
    while hi / lo - 1 > rtol:
        if math.isfinite(g_lo) and g_lo != g_hi:
            t = g_lo / (g_lo - g_hi)
            z = math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
        else:
            z = math.sqrt(lo * hi)
        z = min(max(z, lo * (1 + rtol / 2)), hi / (1 + rtol / 2))
        g_z = g(z)
        if g_z <= 0:
            hi, g_hi = z, g_z
            g_lo, stale = (g_lo / 2 if stale == -1 else g_lo), -1
        else:
            lo, g_lo = z, g_z
            g_hi, stale = (g_hi / 2 if stale == 1 else g_hi), 1
    return lo, hi
