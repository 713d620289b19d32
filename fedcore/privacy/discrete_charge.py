"""What the discrete Gaussian costs, next to what the ledger charges for it.

Theory of operation. fedcore's noise is the discrete Gaussian on a fine grid
(:mod:`fedcore.privacy.noise`), but the ledger charges a :class:`GaussianEvent` at the
*continuous* Gaussian's privacy loss distribution (PLD). The two mechanisms are not the same, so
the charge needs a bound that holds for the discrete one. This module gives two, from Canonne,
Kamath and Steinke, "The Discrete Gaussian for Differential Privacy" (NeurIPS 2020; CKS):

- :func:`discrete_gaussian_delta`: the *exact* delta(epsilon) of the one-dimensional discrete
  Gaussian mechanism with integer sensitivity ``Delta`` (CKS Thm 7):

      delta = P[Y > eps sigma^2 / Delta - Delta / 2] - e^eps P[Y > eps sigma^2 / Delta + Delta / 2],

  ``Y ~ N_Z(0, sigma^2)``, with the discrete tails summed exactly (for moderate ``sigma``: the
  reference against which the continuous curve is compared).
- :func:`discrete_gaussian_epsilon`: a *proven* epsilon for ``count`` rounds of the
  multivariate discrete Gaussian with L2 sensitivity ``Delta`` and noise multiplier
  ``z = sigma / Delta``, as :func:`fedcore.privacy.noise.add_grid_gaussian` releases it. Each
  coordinate with an integer shift ``d_j`` is ``d_j^2 / (2 sigma^2)``-zCDP (CKS Thm 4), the
  coordinates are independent, and zCDP composes additively (Bun and Steinke 2016, Lemma 2.3), so a
  round is ``rho = ||d||^2 / (2 sigma^2) <= 1 / (2 z^2)``-zCDP and ``count`` rounds are
  ``count / (2 z^2)``-zCDP, whatever the dimension and the grid. That is converted to
  (epsilon, delta) by CKS Prop 12 (for every order alpha > 1,
  ``eps = alpha rho + (log(1/delta) - log alpha) / (alpha - 1) + log(1 - 1/alpha)``), minimised
  over alpha.

:func:`charge_gap` puts the bound beside the continuous Gaussian's PLD epsilon (the charge) for the
same event: ``gap = discrete_bound - charged``. The bound is an RDP-style bound, so a part of the
gap is the slack of that route rather than a real difference between the mechanisms. The exact
one-dimensional curve shows the real difference: at sensitivity 1 grid step it is some 10% of
delta either way (the privacy loss takes few values), at 16 steps 0.1%, at 256 steps 4e-6,
shrinking about as the square of the step count; fedcore's sensitivity spans at least
``2**20 sqrt(d)`` grid steps (:func:`fedcore.privacy.noise.grid_step`).

Scope. The bound is for unamplified rounds: :class:`GaussianEvent` (the sample-known epsilon, and
DP-FedAvg at sampling rate 1, fedcore's default ``fraction_train = 1``) and
:class:`PoissonSubsampledGaussian` at rate 1, and :class:`FixedSizeSubsampledGaussian` (charged
as the Gaussian of sensitivity ``2C``, no amplification). For a sampling rate below 1 no bound is given here
(:class:`ConfigError`): the sampled-Gaussian analysis the ledger uses rests on the continuous
Gaussian's rotation invariance, which the discrete Gaussian lacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.optimize

from fedcore.errors import ConfigError
from fedcore.privacy.accountant import AccountantKind, check_delta, epsilon
from fedcore.privacy.events import (
    FixedSizeSubsampledGaussian,
    GaussianEvent,
    PoissonSubsampledGaussian,
    PrivacyEvent,
    SelfComposedEvent,
)

_TAIL_SIGMAS = 40.0  # the discrete tails are summed to 40 sigma: the rest is below 1e-340
_MAX_EXACT_SIGMA = 1e5


def _check_positive(name: str, value: float) -> float:
    if not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def discrete_gaussian_delta(*, epsilon: float, sigma: float, sensitivity: int) -> float:
    """The exact delta at ``epsilon`` of ``x + Y``, ``Y ~ N_Z(0, sigma^2)``, for integer ``x``
    with ``|x - x'| <= sensitivity`` (CKS 2020, Thm 7). Raises :class:`ConfigError` for bad
    arguments or ``sigma`` above 1e5 (the tails are summed point by point)."""
    sigma = _check_positive("sigma", sigma)
    if isinstance(sensitivity, bool) or not isinstance(sensitivity, int) or sensitivity < 1:
        raise ConfigError(f"sensitivity must be an integer >= 1, got {sensitivity!r}")
    if not isinstance(epsilon, int | float) or not (math.isfinite(epsilon) and epsilon >= 0):
        raise ConfigError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    if sigma > _MAX_EXACT_SIGMA:
        raise ConfigError(f"the exact discrete tails are summed for sigma <= 1e5, got {sigma:g}")
    reach = int(math.ceil(_TAIL_SIGMAS * sigma)) + sensitivity
    y = np.arange(-reach, reach + 1, dtype=np.float64)
    weight = np.exp(-(y * y) / (2.0 * sigma * sigma))
    weight /= weight.sum()
    tail = np.cumsum(weight[::-1])[::-1]  # tail[i] = P[Y >= y_i]

    def above(t: float) -> float:
        """P[Y > t]."""
        first = int(np.searchsorted(y, t, side="right"))
        return float(tail[first]) if first < y.size else 0.0

    shift = epsilon * sigma * sigma / sensitivity
    delta = above(shift - sensitivity / 2.0) - math.exp(epsilon) * above(shift + sensitivity / 2.0)
    return max(0.0, delta)


def zcdp_epsilon(*, rho: float, delta: float) -> float:
    """An epsilon at ``delta`` for a ``rho``-zCDP mechanism (CKS 2020, Prop 12, minimised over the
    order alpha; every alpha gives a valid bound, so the minimiser's inexactness only loosens it)."""
    rho = _check_positive("rho", rho)
    log_inv = -math.log(check_delta(delta))

    def at(alpha: float) -> float:
        return alpha * rho + (log_inv - math.log(alpha)) / (alpha - 1.0) + math.log1p(-1.0 / alpha)

    # The minimum lies near alpha = 1 + sqrt(log(1/delta) / rho); search well around it.
    centre = 1.0 + math.sqrt(log_inv / rho)
    found = scipy.optimize.minimize_scalar(
        at, bounds=(1.0 + 1e-9, 4.0 * centre + 10.0), method="bounded", options={"xatol": 1e-10}
    )
    return max(0.0, float(min(found.fun, at(centre))))


def discrete_gaussian_epsilon(*, noise_multiplier: float, count: int, delta: float) -> float:
    """A proven epsilon at ``delta`` for ``count`` releases of the multivariate discrete Gaussian
    with noise multiplier ``noise_multiplier`` (sigma over the L2 sensitivity): ``count / (2 z^2)``
    -zCDP (CKS 2020, Thm 4, per coordinate, composed) converted by :func:`zcdp_epsilon`."""
    z = _check_positive("noise_multiplier", noise_multiplier)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"count must be an integer >= 1, got {count!r}")
    return zcdp_epsilon(rho=count / (2.0 * z * z), delta=delta)


@dataclass(frozen=True, slots=True)
class ChargeGap:
    """The ledger's charge for an event (the continuous Gaussian's epsilon, by the accountant)
    beside a proven epsilon for the discrete Gaussian fedcore draws, at one delta."""

    noise_multiplier: float
    count: int
    delta: float
    charged: float  # continuous Gaussian, as the ledger charges it
    discrete_bound: float  # proven for the discrete Gaussian (zCDP, CKS Thm 4 + Prop 12)

    @property
    def gap(self) -> float:
        """How far the proven discrete epsilon lies above the charge (<= 0: the charge covers it)."""
        return self.discrete_bound - self.charged


def _unamplified(event: PrivacyEvent) -> tuple[float, int]:
    """``(noise_multiplier, count)`` of ``event`` as rounds of the plain Gaussian; ConfigError
    for an event that is not one (a sampling rate below 1, a composition of different events)."""
    inner, times = (
        (event.event, event.count) if isinstance(event, SelfComposedEvent) else (event, 1)
    )
    if isinstance(inner, PoissonSubsampledGaussian) and inner.sampling_rate == 1:
        return float(inner.noise_multiplier), times * inner.count
    if isinstance(inner, GaussianEvent):
        return float(inner.noise_multiplier), times * inner.count
    if isinstance(inner, FixedSizeSubsampledGaussian):  # charged as the Gaussian of 2C
        return float(inner.noise_multiplier) / 2.0, times * inner.count
    raise ConfigError(
        f"no proven discrete-Gaussian bound for {event}: it is given for unamplified Gaussian "
        "rounds (a GaussianEvent, fixed-size sampling, or Poisson sampling at rate 1)"
    )


def charge_gap(
    event: PrivacyEvent, *, delta: float, accountant: AccountantKind | str = AccountantKind.PLD
) -> ChargeGap:
    """The charge of ``event`` (continuous Gaussian, by ``accountant``) and the proven epsilon of
    the discrete Gaussian fedcore draws for it, at ``delta``. Raises :class:`ConfigError` for an
    event other than unamplified Gaussian rounds (see the module's Scope)."""
    z, count = _unamplified(event)
    return ChargeGap(
        noise_multiplier=z,
        count=count,
        delta=check_delta(delta),
        charged=epsilon([GaussianEvent(z, count=count)], delta=delta, accountant=accountant),
        discrete_bound=discrete_gaussian_epsilon(noise_multiplier=z, count=count, delta=delta),
    )
