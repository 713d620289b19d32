"""Site-level DP at a trusted server (DP-FedAvg) on top of secure aggregation.

Theory of operation. DP-FedAvg (McMahan et al., ICLR 2018, Alg. 1, eq. 2; see
:mod:`fedcore.privacy.dpfedavg`) needs only the *sum* of the clipped updates, so it composes with
secure aggregation: each site clips its own update before masking, the server unmasks the sum,
then adds the Gaussian noise and divides by the expected number of sites. The server never sees
an individual update, and what it releases is the same mechanism as without secure aggregation.

What makes the claim exact here is the encoding (:mod:`fedcore.secagg.encoding`): a site sends
``SR(s x) / s`` rather than ``x``, and stochastic rounding moves each coordinate by less than
``1 / s``. So a site clips to ``C_ring = C - sqrt(d) / s`` (:func:`ring_clip_norm`) and its decoded
contribution has L2 norm below ``C``. All sites weigh the same (weight 1, as DP-FedAvg requires:
weighting by examples would let one site's influence exceed ``C``), so the weight coordinate sums
to the number of contributors.

No wrap-around (:func:`dp_encoding`). The per-coordinate clip follows from the L2 clip: an update
of L2 norm at most ``C`` has ``|x_i| <= C``, so ``secagg.clip_range`` plays no part under DP (it
could cut a coordinate, or be passed by adaptive clipping, and then the sum would wrap). With ``n``
sites and ``M = 2**(b-1) - 1``, the scale is ``s = (M - 2n) / (n C)``: each site's coordinate is
at most ``C s = M/n - 2`` before rounding and at most ``M/n - 1`` after, so the sum of ``n`` of them
stays within ``M`` for *every* input, saturating ones included, and the decoded sum equals the sum
of the contributions. In :class:`EncodingConfig` terms this is ``clip = C / (1 - 2n/M)`` and
``max_total_weight = n``. A ring where ``M - 2n <= n sqrt(d)`` leaves no room for ``C`` after the
rounding margin: :func:`check_dp_ring` refuses it before the run.

Plausibility (issue 10, point 6). Every decoded contribution has norm at most ``C``, so a decoded
sum whose norm passes ``contributors * C`` (or whose unclipped count is out of range) means a site
did not follow the protocol: :func:`decode_clipped_sum` raises :class:`ImplausibleSumError` and the
round is discarded with its reason before anything is charged or released.

Adaptive clipping (Andrew et al., NeurIPS 2021, Alg. 1) needs the count of sites whose update norm
was at most ``C``; each site appends its bit ``1[||x|| <= C]`` as one more ring coordinate, exact
(an integer, not scaled), and the server learns only the sum of the bits, which it noises as
:func:`fedcore.privacy.dpfedavg.release_clipped_sum` prescribes.

Assumptions: the server runs this code faithfully (it adds the noise: trusted for privacy of the
release, though it learns only the sum), and sites follow the protocol (a site that skips clipping
or sends a bit of 7 cannot be detected under masking; only the count's range is checked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedcore.crypto import CryptoRng
from fedcore.errors import ConfigError, ImplausibleSumError
from fedcore.mechanisms.base import SiteLevelDP
from fedcore.privacy.transforms import clip_to_norm
from fedcore.secagg import EncodingConfig, decode_sum, encode_update, from_ring, to_ring


@dataclass(frozen=True, slots=True)
class SiteClipping:
    """What a site must do to its update before encoding it: clip to ``clip_norm`` (DP-FedAvg's
    ``C`` for this round) and, with ``count_unclipped``, append its bit for adaptive clipping."""

    clip_norm: float
    count_unclipped: bool


def dp_encoding(*, bits: int, clip_norm: float, sites: int) -> EncodingConfig:
    """The ring encoding of a DP round of ``sites`` sites clipped to L2 norm ``clip_norm``.

    Equal weights (total weight at most ``sites``) and per-coordinate clip ``C / (1 - 2n/M)``, so
    the scale is ``(M - 2n) / (n C)`` and no sum of ``n`` rounded contributions can wrap (module
    docstring). Raises ConfigError when ``M <= 2n`` (then raise ``secagg.bits``).
    """
    n = max(1, int(sites))
    ceiling = (1 << (bits - 1)) - 1
    if not ceiling > 2 * n:
        raise ConfigError(
            f"a {bits}-bit ring cannot hold the rounded sum of {n} sites; raise 'secagg.bits'"
        )
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigError(f"dp.server.clip_norm must be finite and > 0, got {clip_norm!r}")
    return EncodingConfig(bits=bits, clip=clip_norm / (1 - 2 * n / ceiling), max_total_weight=n)


def check_dp_ring(*, bits: int, sites: int, dim: int) -> None:
    """Refuse, before a run, a ring in which ``sites`` DP contributions of ``dim`` coordinates do
    not fit with their rounding margin (whatever the clip norm: the condition does not depend on it).

    Raises :class:`ConfigError` naming ``secagg.bits``.
    """
    config = dp_encoding(bits=bits, clip_norm=1.0, sites=sites)
    ring_clip_norm(1.0, dim=dim, config=config)


def ring_clip_norm(clip_norm: float, *, dim: int, config: EncodingConfig) -> float:
    """``C - sqrt(dim) / s``: the norm a site clips to so that its *encoded* update is below ``C``.

    Raises ConfigError when the ring is too coarse for ``C`` (then raise ``secagg.bits`` or lower
    ``secagg.clip_range``).
    """
    margin = math.sqrt(dim) / config.scale
    if not clip_norm > margin:
        raise ConfigError(
            f"dp.server.clip_norm {clip_norm:g} is not above the rounding margin sqrt(d)/s = "
            f"{margin:.3g} of a {config.bits}-bit ring (d={dim}); raise 'secagg.bits' or lower "
            "'secagg.clip_range'"
        )
    return clip_norm - margin


def session_length(dim: int, clipping: SiteClipping | None) -> int:
    """Ring elements a site sends: the update, its weight, and the adaptive-clipping bit if any."""
    return dim + 1 + int(clipping is not None and clipping.count_unclipped)


def encode_clipped_update(
    update: np.ndarray, *, clipping: SiteClipping, config: EncodingConfig, rng: CryptoRng
) -> np.ndarray:
    """A site's DP contribution as ring elements: clip, encode with weight 1, append the bit.

    Raises ConfigError when the ring is too coarse for the clip norm, LocalProtocolError for an
    update :func:`fedcore.secagg.encode_update` refuses (nothing is drawn from ``rng`` then).
    """
    x = np.asarray(update)
    if not config.clip >= clipping.clip_norm:
        # |x_i| <= C after the L2 clip: a smaller coordinate range would cut the update, and a
        # server that offers one is not running the DP encoding (it could make the sum wrap).
        raise ConfigError(
            f"the encoding's coordinate range {config.clip:g} is below the clip norm "
            f"{clipping.clip_norm:g}; refusing to encode a DP contribution with it"
        )
    target = ring_clip_norm(clipping.clip_norm, dim=x.size, config=config)
    clipped = clip_to_norm([x], clip_norm=target).value[0]
    vector = encode_update(clipped, weight=1, config=config, rng=rng)
    if not clipping.count_unclipped:
        return vector
    norm = float(np.linalg.norm(x.astype(np.float64)))
    bit = to_ring(np.array([int(norm <= clipping.clip_norm)]), bits=config.bits)
    return np.concatenate([vector, bit])


@dataclass(frozen=True, slots=True)
class ClippedSum:
    """The unmasked sum of a DP round: ``sum_i clip(x_i)``, how many sites it holds, and how many
    of them were within the clip norm (None without adaptive clipping)."""

    total: np.ndarray
    contributors: int
    unclipped: int | None


def decode_clipped_sum(
    total: np.ndarray, *, clipping: SiteClipping, config: EncodingConfig
) -> ClippedSum:
    """Split the unmasked ring sum of :func:`encode_clipped_update` contributions.

    Raises :class:`ImplausibleSumError` (a RemoteProtocolError) when the unclipped count is out of
    range or the decoded sum's norm exceeds ``contributors * C``: each honest contribution decodes
    to norm at most ``C`` (rounding margin included), so some site did not follow the protocol.
    LocalProtocolError (from :func:`decode_sum`) for a total weight outside the encoding's range.
    """
    v = np.asarray(total)
    unclipped = None
    if clipping.count_unclipped:
        unclipped = int(from_ring(v[-1:], bits=config.bits)[0])
        v = v[:-1]
    summed, contributors = decode_sum(v, config=config)
    if unclipped is not None and not 0 <= unclipped <= contributors:
        raise ImplausibleSumError(
            f"the sites' unclipped count is {unclipped}, outside 0..{contributors} contributors"
        )
    norm = float(np.linalg.norm(summed))
    bound = contributors * clipping.clip_norm
    if not norm <= bound * (1 + 1e-9):
        raise ImplausibleSumError(
            f"the decoded sum has norm {norm:.6g}, above {contributors} contributors x clip norm "
            f"{clipping.clip_norm:g} = {bound:.6g}: a site did not clip; round discarded"
        )
    return ClippedSum(total=summed, contributors=contributors, unclipped=unclipped)


@dataclass(frozen=True, slots=True, kw_only=True)
class CentralOnSecAgg(SiteLevelDP):
    """DP-FedAvg on the securely aggregated sum: the site half clips and encodes
    (:func:`encode_clipped_update`), the server half decodes (:func:`decode_clipped_sum`) and adds
    the Gaussian (:func:`fedcore.privacy.dpfedavg.release_clipped_sum`). The server learns only the
    sum, but it adds the noise: trusted for the privacy of the release."""

    name: ClassVar[str] = "central-gaussian-on-secagg"
    on_secagg: ClassVar[bool] = True

    ring_bits: int
    # Per round: the probability that whether the round runs reveals a site's presence (a round
    # skipped for too few Poisson-sampled sites; :mod:`fedcore.privacy.skips`), charged each round.
    skip_probability: float = 0.0

    @property
    def title(self) -> str:
        return "DP-FedAvg on the securely aggregated sum, Gaussian noise at the server"

    @property
    def round_reveal(self) -> float:
        return self.skip_probability

    def _check_fit(self, *, dim: int) -> None:
        from fedcore.privacy.skips import delta_used

        check_dp_ring(bits=self.ring_bits, sites=self.sites, dim=dim)
        used = delta_used(self.skip_probability, self.rounds)
        if not used < self.delta:
            raise ConfigError(
                f"with {self.sites} sites sampled at rate {self.sampling_rate:g}, a round is "
                f"skipped for too few sampled sites often enough that {self.rounds} rounds reveal "
                f"a site's presence with probability {used:.3g}, at least dp.server.delta "
                f"{self.delta:g}: raise 'sites' or 'fraction_train', or lower 'secagg.threshold'"
            )

    def clipping(self, clip_norm: float) -> SiteClipping:
        """What the sites must do this round, at the round's (possibly adaptive) ``clip_norm``."""
        return SiteClipping(clip_norm, self.adaptive)

    def encoding(self, clipping: SiteClipping, *, sites: int, dim: int) -> EncodingConfig:
        """The ring encoding of a round of ``sites`` sites; ConfigError, before anything is sent,
        when the ring is too coarse for the clip norm."""
        config = dp_encoding(bits=self.ring_bits, clip_norm=clipping.clip_norm, sites=sites)
        ring_clip_norm(clipping.clip_norm, dim=dim, config=config)
        return config
