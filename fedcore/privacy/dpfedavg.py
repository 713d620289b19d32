"""Site-level differential privacy at a trusted server: DP-FedAvg with fixed or adaptive clipping.

Theory of operation. McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent
Language Models" (ICLR 2018), Alg. 1 with the fixed-denominator estimator (eq. 2 there): each
round, every participating site's model update ``Delta_i`` is clipped to L2 norm ``C``; the server
releases

    Delta = ( sum_i clip(Delta_i, C) + N(0, (z_Delta * C)^2 I) ) / m

where ``m`` is the *expected* number of participants (a public constant; dividing by the actual
count would make the denominator data-dependent). Weights are equal: weighting by a site's number
of examples would let one site's influence exceed ``C``. The guarantee is for the unit "one whole
site" under add/remove adjacency, against anyone who sees the released models, assuming the
server is trusted with the raw updates.

Sampling and accounting. With Poisson sampling (each of ``N`` sites joins a round independently
with probability ``q = m / N``, drawn from a CSPRNG and kept secret), a round is the
Poisson-subsampled Gaussian with rate ``q`` (Abadi et al. 2016 amplification). With fixed-size
sampling (exactly ``m`` sites) no Poisson amplification is claimed: the round is charged as a
Gaussian with sensitivity ``2C`` (see :class:`~fedcore.privacy.events.FixedSizeSubsampledGaussian`).

Adaptive clipping. Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private Learning with
Adaptive Clipping" (NeurIPS 2021), Alg. 1: the server also releases the noisy count of sites whose
update norm is at most ``C`` (bits centred at 1/2, noise ``sigma_b``), estimates the unclipped
fraction ``b~ = count / m + 1/2`` and moves ``C`` geometrically toward the target quantile
``gamma``: ``C <- C * exp(-eta_C * (b~ - gamma))``. Both releases are one Gaussian mechanism on the
same sites; for a total noise multiplier ``z`` the update noise is
``z_Delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` (their Thm 1), so the charged event has noise ``z``
and includes the count.

Order of operations: the updates are validated, the round's event is charged to the federation
ledger (which raises :class:`BudgetExceededError` and releases nothing if it would pass the
budget), and only then is the noisy aggregate computed and returned.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError, InvalidMessage, LocalProtocolError
from fedcore.privacy.events import (
    ComposedEvent,
    FixedSizeSubsampledGaussian,
    GaussianEvent,
    PoissonSubsampledGaussian,
    PrivacyEvent,
    RevealedWithProbability,
)
from fedcore.privacy.ledger import PrivacyLedger, ScopeKind
from fedcore.privacy.relations import SiteRelation
from fedcore.privacy.sample_known import sample_known_round_event
from fedcore.privacy.transforms import (
    add_gaussian_noise,
    check_update,
    clip_to_norm,
    combine_gaussians,
    global_norm,
    noisy_count,
    scale_update,
    sum_updates,
)

S = TypeVar("S")


class Clipping(enum.Enum):
    FIXED = "fixed"
    ADAPTIVE = "adaptive"


class SiteSampling(enum.Enum):
    POISSON = "poisson"
    FIXED_SIZE = "fixed_size"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerDPConfig:
    """Settings of DP-FedAvg. ``sites_per_round`` is expected (Poisson) or exact (fixed-size).

    ``count_noise_std`` (sigma_b, adaptive clipping only) defaults to
    ``max(sites_per_round / 20, noise_multiplier)``: Andrew et al. suggest ``m / 20``, which for
    small federations leaves no room for the update noise (``2 sigma_b`` must exceed ``z``).
    """

    total_sites: int
    sites_per_round: float
    noise_multiplier: float
    clip_norm: float
    clipping: Clipping = Clipping.FIXED
    sampling: SiteSampling = SiteSampling.POISSON
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_noise_std: float | None = None
    # Per round, the probability that the round's outcome reveals a site beyond the noised sum
    # (a round skipped for too few sampled sites under secure aggregation: fedcore.privacy.skips).
    reveal_probability: float = 0.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.total_sites, bool)
            or not isinstance(self.total_sites, int)
            or self.total_sites < 1
        ):
            raise ConfigError(f"total_sites must be an integer >= 1, got {self.total_sites!r}")
        if (
            not isinstance(self.sites_per_round, int | float)
            or not 0 < self.sites_per_round <= self.total_sites
        ):
            raise ConfigError(
                f"sites_per_round must be in (0, total_sites={self.total_sites}], "
                f"got {self.sites_per_round!r}"
            )
        if (
            self.sampling is SiteSampling.FIXED_SIZE
            and int(self.sites_per_round) != self.sites_per_round
        ):
            raise ConfigError(
                "fixed-size sampling needs an integer sites_per_round, "
                f"got {self.sites_per_round!r}"
            )
        for name in ("noise_multiplier", "clip_norm", "clip_learning_rate"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
                raise ConfigError(f"dp.server.{name} must be finite and > 0, got {value!r}")
        if not isinstance(self.clipping, Clipping) or not isinstance(self.sampling, SiteSampling):
            raise ConfigError(
                f"clipping/sampling must be enums, got {self.clipping!r}, {self.sampling!r}"
            )
        if not 0 < self.target_quantile < 1:
            raise ConfigError(f"target_quantile must be in (0, 1), got {self.target_quantile!r}")
        if self.clipping is Clipping.ADAPTIVE:
            sigma_b = self.count_std
            if not (math.isfinite(sigma_b) and sigma_b > 0):
                raise ConfigError(f"count_noise_std must be finite and > 0, got {sigma_b!r}")
            if 2 * sigma_b <= self.noise_multiplier:
                raise ConfigError(
                    f"adaptive clipping needs 2 * count_noise_std ({2 * sigma_b:g}) > "
                    f"noise_multiplier ({self.noise_multiplier:g}); raise count_noise_std"
                )

    @property
    def sampling_rate(self) -> float:
        return self.sites_per_round / self.total_sites

    @property
    def count_std(self) -> float:
        """sigma_b, the noise on the clipped count (adaptive clipping)."""
        if self.count_noise_std is not None:
            return float(self.count_noise_std)
        return max(self.sites_per_round / 20.0, self.noise_multiplier)

    @property
    def update_noise_multiplier(self) -> float:
        """z_Delta: the noise on the update sum over C (Andrew et al. 2021, Thm 1)."""
        z = float(self.noise_multiplier)
        if self.clipping is Clipping.FIXED:
            return z
        return (z**-2 - (2 * self.count_std) ** -2) ** -0.5

    def sample_known_event(self, relation: SiteRelation = SiteRelation.ZERO_OUT) -> GaussianEvent:
        """A round's event for one participating site against an observer who knows the sample:
        the Gaussian mechanism without amplification, under ``relation`` (zero-out: sensitivity
        ``C``; replace-one: ``2C``; :func:`~fedcore.privacy.sample_known.sample_known_round_event`).
        Under fixed-size sampling it is replace-one's for either relation (sensitivity ``2C``, as
        :class:`FixedSizeSubsampledGaussian` explains). ConfigError for add/remove."""
        if self.sampling is SiteSampling.FIXED_SIZE:
            relation = relation if relation is SiteRelation.ADD_REMOVE else SiteRelation.REPLACE_ONE
        return sample_known_round_event(
            noise_multiplier=float(self.noise_multiplier), relation=relation
        )

    def round_event(self) -> PrivacyEvent:
        """The event one round charges to the federation ledger (the same every round)."""
        z = float(self.noise_multiplier)
        event: PrivacyEvent
        if self.sampling is SiteSampling.POISSON:
            event = PoissonSubsampledGaussian(sampling_rate=self.sampling_rate, noise_multiplier=z)
        else:
            event = FixedSizeSubsampledGaussian(
                sample_size=int(self.sites_per_round),
                population_size=self.total_sites,
                noise_multiplier=z,
            )
        if self.reveal_probability > 0:
            return ComposedEvent((event, RevealedWithProbability(self.reveal_probability)))
        return event


@dataclass(frozen=True, slots=True)
class ServerRound:
    """What one DP-FedAvg round released, and its cost.

    ``aggregate`` is the noisy mean update. ``unclipped_fraction`` is the noisy estimate ``b~``
    (adaptive clipping; None for fixed). ``epsilon`` is the federation's spend after this round.
    """

    aggregate: list[np.ndarray]
    event: PrivacyEvent
    epsilon: float
    clip_norm: float
    next_clip_norm: float
    unclipped_fraction: float | None
    contributors: int


def dp_fedavg_round(
    updates: Sequence[Sequence[np.ndarray]],
    *,
    shapes: Sequence[tuple[int, ...]],
    config: ServerDPConfig,
    clip_norm: float,
    ledger: PrivacyLedger,
    rng: CryptoRng,
    round_number: int | None = None,
    dtype: type[np.floating] = np.float32,
) -> ServerRound:
    """One DP-FedAvg aggregation: validate, charge ``ledger``, clip, sum, noise, divide by ``m``.

    ``updates`` are the participating sites' updates (sites that declined or dropped are simply
    absent); ``shapes`` are the model's array shapes; ``clip_norm`` is this round's ``C`` (the
    config's for fixed clipping, the previous round's ``next_clip_norm`` for adaptive).

    Raises :class:`InvalidMessage` naming the first malformed update (NaN, infinite, wrong shape)
    before anything is charged (an adapter should drop such a site and call again);
    :class:`BudgetExceededError` if the round would pass the federation budget (ledger unchanged,
    nothing released); :class:`LocalProtocolError` for more updates than a fixed-size sample.
    """
    shapes = [tuple(int(d) for d in s) for s in shapes]
    for i, update in enumerate(updates):
        try:
            check_update(update, shapes=shapes)
        except InvalidMessage as exc:
            raise InvalidMessage(f"update of participant {i}: {exc}") from None
    if config.sampling is SiteSampling.FIXED_SIZE and len(updates) > config.sites_per_round:
        raise LocalProtocolError(
            f"{len(updates)} updates for a fixed-size sample of {int(config.sites_per_round)} sites"
        )

    norms = [global_norm(u) for u in updates]
    clipped = [clip_to_norm(u, clip_norm=clip_norm).value for u in updates]
    unclipped = sum(1 for n in norms if n <= clip_norm)
    return release_clipped_sum(
        sum_updates(clipped, shapes=shapes),
        contributors=len(updates),
        unclipped=unclipped if config.clipping is Clipping.ADAPTIVE else None,
        config=config,
        clip_norm=clip_norm,
        ledger=ledger,
        rng=rng,
        round_number=round_number,
        dtype=dtype,
    )


def release_clipped_sum(
    clipped_sum: Sequence[np.ndarray],
    *,
    contributors: int,
    unclipped: int | None,
    config: ServerDPConfig,
    clip_norm: float,
    ledger: PrivacyLedger,
    rng: CryptoRng,
    round_number: int | None = None,
    dtype: type[np.floating] = np.float32,
) -> ServerRound:
    """The release half of DP-FedAvg, for a caller that only holds the sum of the clipped updates.

    ``clipped_sum`` is ``sum_i clip(Delta_i, C)`` over ``contributors`` sites, each term of L2 norm
    at most ``clip_norm`` (the caller guarantees it: :func:`dp_fedavg_round` clips itself; under
    secure aggregation each site clips before masking and the server sees only the sum).
    ``unclipped`` is the exact count of contributors whose update norm was at most ``clip_norm``
    (adaptive clipping only; None for fixed). Charges ``ledger`` first: BudgetExceededError leaves
    it unchanged and releases nothing. Then adds the noise of eq. (2) and divides by ``m``.
    """
    _check_release(
        config=config,
        clip_norm=clip_norm,
        ledger=ledger,
        unclipped=unclipped,
        contributors=contributors,
    )
    event = config.round_event()
    entry = ledger.charge(event, round_number=round_number, label="dp-fedavg round")

    noised = add_gaussian_noise(
        clipped_sum,
        std=config.update_noise_multiplier * clip_norm,
        sensitivity=clip_norm,
        rng=rng,
    )
    released: list[GaussianEvent] = [noised.event]  # type: ignore[list-item]
    next_clip, fraction = float(clip_norm), None
    if unclipped is not None:
        count = noisy_count(unclipped - contributors / 2.0, noise_std=config.count_std, rng=rng)
        released.append(count.event)  # type: ignore[arg-type]
        fraction, next_clip = _adapted_clip(config, clip_norm=clip_norm, centred_count=count.value)
    # What was released must be at least as noisy as what was charged.
    if combine_gaussians(released).noise_multiplier < config.noise_multiplier * (1 - 1e-9):
        raise LocalProtocolError("released noise is below the charged noise multiplier")
    mean = scale_update(noised.value, factor=1.0 / config.sites_per_round)
    return ServerRound(
        aggregate=[a.astype(dtype) for a in mean],
        event=event,
        epsilon=entry.epsilon_after,
        clip_norm=float(clip_norm),
        next_clip_norm=next_clip,
        unclipped_fraction=fraction,
        contributors=contributors,
    )


def _check_release(
    *,
    config: ServerDPConfig,
    clip_norm: float,
    ledger: PrivacyLedger,
    unclipped: int | None,
    contributors: int,
) -> None:
    """Raise unless a release with these arguments is well-formed; nothing is charged or drawn.

    :class:`ConfigError` for a ledger of another scope or a bad ``clip_norm``;
    :class:`LocalProtocolError` for an unclipped count that does not match the clipping mode or
    lies outside ``0..contributors``.
    """
    if ledger.scope.kind is not ScopeKind.FEDERATION_SITES:
        raise ConfigError(f"DP-FedAvg charges a federation_sites ledger, got {ledger.scope}")
    if not isinstance(clip_norm, int | float) or not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigError(f"clip_norm must be finite and > 0, got {clip_norm!r}")
    if config.clipping is Clipping.FIXED and clip_norm != config.clip_norm:
        raise ConfigError(f"fixed clipping uses clip_norm {config.clip_norm}, got {clip_norm}")
    if (unclipped is None) != (config.clipping is Clipping.FIXED):
        raise LocalProtocolError(
            "adaptive clipping needs the unclipped count and fixed clipping takes none; "
            f"got {unclipped!r} with {config.clipping.value} clipping"
        )
    if unclipped is not None and not 0 <= unclipped <= contributors:
        raise LocalProtocolError(f"unclipped count {unclipped} outside 0..{contributors}")


def _adapted_clip(
    config: ServerDPConfig, *, clip_norm: float, centred_count: float
) -> tuple[float, float]:
    """Andrew et al. 2021, Alg. 1: the noisy unclipped fraction ``b~ = count / m + 1/2`` (the count
    was centred at ``contributors / 2``) and the next clip ``C exp(-eta_C (b~ - gamma))``."""
    fraction = centred_count / config.sites_per_round + 0.5
    next_clip = clip_norm * math.exp(
        -config.clip_learning_rate * (fraction - config.target_quantile)
    )
    return fraction, next_clip


def poisson_sample(sites: Sequence[S], *, rate: float, rng: CryptoRng) -> list[S]:
    """Each site independently with probability ``rate``, from ``rng`` (keep the draw secret)."""
    if not 0 < rate <= 1:
        raise ConfigError(f"sampling rate must be in (0, 1], got {rate!r}")
    keep = rng.uniform(len(sites)) < rate
    return [s for s, k in zip(sites, keep, strict=True) if k]


def fixed_size_sample(sites: Sequence[S], *, size: int, rng: CryptoRng) -> list[S]:
    """Exactly ``size`` distinct sites, uniformly, by a partial Fisher-Yates shuffle on ``rng``."""
    if not 0 < size <= len(sites):
        raise ConfigError(f"sample size must be in 1..{len(sites)}, got {size!r}")
    pool = list(sites)
    for i in range(size):
        j = i + _below(rng, len(pool) - i)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:size]


def _below(rng: CryptoRng, bound: int) -> int:
    """A uniform integer in [0, bound), by rejection on ``bits``-bit draws (no modulo bias)."""
    bits = max(1, (bound - 1).bit_length())
    while True:
        value = int(rng.integers_below_pow2(1, bits)[0])
        if value < bound:
            return value
