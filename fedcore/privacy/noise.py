"""Gaussian noise that resists floating-point attacks: the discrete Gaussian on a fine grid.

Theory of operation. Mironov ("On Significance of the Least Significant Bits for Differential
Privacy", CCS 2012) showed that adding floating-point noise to a floating-point value leaks the
value through the low-order bits of the sum: the set of doubles ``x + noise`` can reach depends on
``x``. Jin, McMurtry, Rubinstein and Ohrimenko ("Are We There Yet? Timing and Floating-Point
Attacks on Differential Privacy Systems", IEEE S&P 2022) showed the same for the Gaussian
mechanism as implemented by libraries, Box-Muller noise included (fedcore's earlier noise).

fedcore releases on a grid instead, as Canonne, Kamath and Steinke ("The Discrete Gaussian for
Differential Privacy", NeurIPS 2020) prescribe:

1. choose a grid ``gamma = 2**k`` with ``gamma * sqrt(d) <= 2**-20 * Delta`` (``Delta``: the L2
   sensitivity, ``d``: the dimension);
2. round the value to the grid, ``k_x = round(x / gamma)`` (exact: ``gamma`` is a power of two);
   rounding moves each of two neighbouring values by at most ``gamma / 2`` per coordinate, so the
   integer vectors differ by at most ``Delta' = Delta + gamma sqrt(d)`` in L2 (in units of gamma,
   ``Delta' / gamma``);
3. add integer noise ``K`` from the discrete Gaussian ``N_Z(0, (sigma' / gamma)^2)`` per
   coordinate, with ``sigma' = sigma (1 + gamma sqrt(d) / Delta)``, so that
   ``sigma' / Delta' = sigma / Delta``: the noise multiplier the ledger was charged is kept
   exactly (CKS Thm 4 and Sec. 3: the discrete Gaussian is at least as private, in concentrated
   DP, as the continuous one with the same sigma and sensitivity). The ledger charges the
   continuous Gaussian's PLD, which is tighter than that concentrated-DP bound and not proven for
   the discrete one; :mod:`fedcore.privacy.discrete_charge` gives the proven bound and its gap to
   the charge (:func:`~fedcore.privacy.discrete_charge.charge_gap`), and the exact 1-D curve;
4. release ``gamma (k_x + K)``: an integer times a power of two, computed exactly in float64
   (``|k_x + K| < 2**53`` is checked). Every output is a grid point, whatever ``x`` was, so its
   low-order bits carry nothing; casting it to float32 afterwards is post-processing.

The integer sampler is CKS Alg. 3 (rejection from the discrete Laplace with ``t = floor(sigma)+1``,
accepting ``Y`` with probability ``exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2))``), vectorised: the
discrete Laplace is drawn as in CKS Alg. 2, a geometric magnitude by inversion and a random sign,
rejecting a negative zero (two 64-bit keystream words per candidate: the magnitude's 53 uniform
bits and the sign bit share one, the acceptance coin takes the other). Every coin comes from a
:class:`CryptoRng`. One pass of 9,000 draws is about 16 numpy operations over 12,000 candidates
and one keystream call; the order in which coins are read and every float operation are fixed
(the tests pin the draws for a seed), so a faster arrangement cannot change the distribution
unnoticed. The acceptance
probabilities are computed in float64, so the sampled distribution differs from the exact one by
float64 rounding of those probabilities (relative error about 2**-52), a property of the
distribution of an *integer*, not of the bits of the output, which is what the attacks read.
"""

from __future__ import annotations

import math

import numpy as np

from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError

MECHANISM = "discrete Gaussian on a 2^k grid (Canonne, Kamath and Steinke 2020)"
GRID_SHRINK = 2.0**-20  # gamma * sqrt(d) is at most this fraction of the sensitivity
_EXACT = 2.0**53
_PASS = 12288  # candidates per sampler pass (192 KiB of keystream): 9,000 draws in one pass


def grid_step(*, sensitivity: float, dim: int) -> float:
    """The grid ``gamma = 2**floor(log2(2**-20 * sensitivity / sqrt(dim)))``."""
    if not (math.isfinite(sensitivity) and sensitivity > 0) or dim < 1:
        raise ConfigError(f"grid_step needs sensitivity > 0 and dim >= 1, got {sensitivity}, {dim}")
    return 2.0 ** math.floor(math.log2(GRID_SHRINK * sensitivity / math.sqrt(dim)))


def discrete_gaussian(n: int, *, sigma: float, rng: CryptoRng) -> np.ndarray:
    """``n`` independent draws of the discrete Gaussian N_Z(0, sigma^2) (CKS 2020, Alg. 3), int64."""
    out = np.zeros(n, dtype=np.float64)
    _add_discrete_gaussian(out, sigma=sigma, rng=rng)
    return out.astype(np.int64)  # integer-valued floats below 2**53 in magnitude: exact


def _add_discrete_gaussian(total: np.ndarray, *, sigma: float, rng: CryptoRng) -> None:
    """Add ``total.size`` draws of N_Z(0, sigma^2) to the float64 vector ``total`` in place (the
    draws of :func:`discrete_gaussian` with the same generator, without an int64 copy). Raises
    :class:`ConfigError` for a bad ``sigma`` or a generator that is not a CryptoRng, before
    anything is drawn or changed."""
    n = total.size
    if not (math.isfinite(sigma) and sigma > 0) or sigma > 2.0**50:
        raise ConfigError(f"discrete Gaussian sigma must be in (0, 2**50], got {sigma!r}")
    if not isinstance(rng, CryptoRng):
        raise ConfigError(f"noise must come from a CryptoRng, got {type(rng).__name__}")
    t = math.floor(sigma) + 1.0
    # Alg. 3 accepts about 0.76 of its candidates for large sigma, 0.54 at sigma = 1; a short
    # batch is topped up by the next pass of the loop, so the factor only sets the speed.
    factor = 1.35 if sigma >= 3 else 2.0
    filled = 0
    while filled < n:
        want = n - filled
        # At most _PASS candidates a pass: the temporaries stay small enough to live in cache;
        # drawing 18,000 at once measured several times slower per draw here than 9,000.
        batch = min(_PASS, int(want * factor) + 16)
        words = rng.uint64(2 * batch)  # one keystream call per pass
        head, coin = words[:batch], words[batch:]
        # Discrete Laplace with scale t (CKS Alg. 2), by sign and magnitude: the magnitude is
        # Geometric(1 - exp(-1/t)) by inversion, floor(-t ln(1 - U)) with U the top 53 bits of
        # ``head`` times 2**-53 (exact in float64); the sign is the lowest bit of ``head``
        # (independent keystream bits); a negative zero is rejected (below), so that every
        # integer y has probability proportional to exp(-|y|/t).
        magnitude = (head >> np.uint64(11)).view(np.int64).astype(np.float64)
        magnitude *= -(2.0**-53)
        magnitude += 1.0  # 1 - U, exact (U = j 2**-53, j < 2**53); np.log is SIMD, log1p is not
        np.log(magnitude, out=magnitude)
        magnitude *= -t
        np.floor(magnitude, out=magnitude)
        # Alg. 3: accept y with probability a = exp(-(|y| - sigma^2/t)^2 / (2 sigma^2)), with a
        # coin U' = j 2**-53 (j: the top 53 bits of ``coin``): U' < a exactly when j < a 2**53
        # (scaling by a power of two is exact), compared without converting j to a fraction.
        accept = magnitude - sigma * sigma / t
        np.square(accept, out=accept)
        accept *= -1.0 / (2.0 * sigma * sigma)
        np.exp(accept, out=accept)
        accept *= 2.0**53
        coin >>= np.uint64(11)
        keep = np.less(coin.view(np.int64), accept)
        # The sign goes into the float's sign bit (the lowest keystream bit shifted to bit 63):
        # one integer pass instead of a masked negation, which numpy runs element by element.
        head <<= np.uint64(63)
        np.bitwise_or(magnitude.view(np.uint64), head, out=magnitude.view(np.uint64))
        kept = np.compress(keep, magnitude)
        if np.count_nonzero(kept) < kept.size:  # a zero: probability about 1/t per candidate
            kept = kept[~((kept == 0) & np.signbit(kept))]  # reject a negative zero
        kept = kept[:want]
        total[filled : filled + kept.size] += kept  # integer-valued floats
        filled += kept.size


def add_grid_gaussian(
    x: np.ndarray, *, std: float, sensitivity: float, rng: CryptoRng
) -> tuple[np.ndarray, float]:
    """``x`` (flat) released with discrete Gaussian noise on a grid; returns ``(out, gamma)``.

    ``out`` is float64 and every entry is an integer multiple of ``gamma``. The noise has standard
    deviation ``std * (1 + gamma sqrt(d) / sensitivity)`` (within 2**-20 of ``std``) for the
    sensitivity ``sensitivity + gamma sqrt(d)`` of the rounded value, so the noise multiplier is
    ``std / sensitivity`` exactly. Raises :class:`ConfigError` for bad parameters or a value too
    large for the grid (beyond 2**53 grid steps).
    """
    for name, value in (("std", std), ("sensitivity", sensitivity)):
        if not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be finite and > 0, got {value!r}")
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    dim = max(1, flat.size)
    gamma = grid_step(sensitivity=sensitivity, dim=dim)
    widened = std * (1.0 + gamma * math.sqrt(dim) / sensitivity)
    total = flat * (1.0 / gamma)  # exact: gamma is a power of two
    np.rint(total, out=total)
    _add_discrete_gaussian(total, sigma=widened / gamma, rng=rng)
    if flat.size and not max(float(total.max()), -float(total.min())) < _EXACT:
        raise ConfigError(
            f"a value of magnitude {float(np.max(np.abs(flat))):.3g} is too large for the noise "
            f"grid {gamma:.3g} (at most 2**53 grid steps)"
        )
    total *= gamma
    return total, gamma
