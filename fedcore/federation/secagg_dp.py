"""Site-level DP at a trusted server (DP-FedAvg) on top of secure aggregation.

Theory of operation. DP-FedAvg (McMahan et al., ICLR 2018, Alg. 1, eq. 2; see
:mod:`fedcore.privacy.dpfedavg`) needs only the *sum* of the clipped updates, so it composes with
secure aggregation: each site clips its own update before masking, the server unmasks the sum,
then adds the Gaussian noise and divides by the expected number of sites. The server never sees
an individual update, and what it releases is the same mechanism as without secure aggregation.

What makes the claim exact here is the encoding (:mod:`fedcore.secagg.encoding`): a site sends
``SR(s x) / s`` rather than ``x``, and stochastic rounding moves each coordinate by less than
``1 / s``. So a site clips to ``C_ring = C - sqrt(d) / s`` (:func:`ring_clip_norm`) and its decoded
contribution has L2 norm below ``C``; per-coordinate clipping to ``[-r, r]`` only shrinks it further.
All sites weigh the same (weight 1, as DP-FedAvg requires: weighting by examples would let one
site's influence exceed ``C``), so the weight coordinate sums to the number of contributors, and
the ring must hold only ``sites * r``: ``max_total_weight`` is the number of sampled sites.

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

import numpy as np

from fedcore.crypto import CryptoRng
from fedcore.errors import ConfigError, LocalProtocolError
from fedcore.privacy.transforms import clip_to_norm
from fedcore.secagg import EncodingConfig, decode_sum, encode_update, from_ring, to_ring


@dataclass(frozen=True, slots=True)
class SiteClipping:
    """What a site must do to its update before encoding it: clip to ``clip_norm`` (DP-FedAvg's
    ``C`` for this round) and, with ``count_unclipped``, append its bit for adaptive clipping."""

    clip_norm: float
    count_unclipped: bool


def dp_encoding(*, bits: int, clip_range: float, sites: int) -> EncodingConfig:
    """The ring encoding of a DP round: equal weights, so the total weight is at most ``sites``."""
    return EncodingConfig(bits=bits, clip=clip_range, max_total_weight=max(1, sites))


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

    Raises LocalProtocolError when a count is out of range (the sum wrapped, or a site lied).
    """
    v = np.asarray(total)
    unclipped = None
    if clipping.count_unclipped:
        unclipped = int(from_ring(v[-1:], bits=config.bits)[0])
        v = v[:-1]
    summed, contributors = decode_sum(v, config=config)
    if unclipped is not None and not 0 <= unclipped <= contributors:
        raise LocalProtocolError(
            f"the sites' unclipped count is {unclipped}, outside 0..{contributors} contributors"
        )
    return ClippedSum(total=summed, contributors=contributors, unclipped=unclipped)
