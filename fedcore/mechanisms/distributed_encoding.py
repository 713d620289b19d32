"""Distributed DP's integer encoding: the site's transform chain and the server's decode.

Theory of operation (Kairouz, Liu and Steinke, ICML 2021, Alg. 1 and 2; Agarwal, Kairouz and Liu,
NeurIPS 2021, Alg. 1). A site turns its float update ``x`` in R^d into ``d' = 2**ceil(log2 d)``
ring elements, in this order:

1. clip to L2 norm ``c`` (:func:`fedcore.privacy.transforms.clip_to_norm`) and pad with zeros;
2. rotate, ``z = H D x / sqrt(d')``: ``D`` a diagonal of random signs from a *public* per-round
   seed (every site and the server use the same one), ``H`` the Walsh-Hadamard matrix. The map is
   orthonormal, so ``||z|| = ||x|| <= c``, and it spreads the mass evenly over the coordinates
   (each coordinate is a Rademacher sum, sub-Gaussian with proxy ``||x||^2 / d'``; KLS21 Sec. 4),
   which is what keeps the sum inside a small ring;
3. scale by ``gamma``: the grid step is ``1 / gamma``; ``||gamma z|| <= C = gamma c``;
4. conditional randomized rounding (KLS21 Sec. 4): stochastic rounding (unbiased, coins from a
   CSPRNG), retried until the integer vector's L2 norm is at most ``Delta_2``
   (:func:`fedcore.privacy.distributed.rounded_l2_bound`); a try fails with probability at most
   ``beta``, so ``max_attempts`` tries all fail with probability at most ``beta**max_attempts``,
   and then the site refuses to send (:class:`LocalProtocolError`) rather than send a vector the
   accounting does not cover. The bound is checked on the integers themselves, so the sensitivity
   the accountant uses holds whatever the float error of the steps before;
5. add discrete noise, the site's share: ``N_Z(0, sigma^2)`` per coordinate (CKS20's sampler,
   :func:`fedcore.privacy.noise.discrete_gaussian`) or Skellam ``Poisson(mu/2) - Poisson(mu/2)``
   (:func:`skellam`), every coin from a :class:`~fedcore.crypto.CryptoRng`;
6. reduce modulo 2**bits (:func:`fedcore.secagg.encoding.to_ring`).

Only the sum has to fit in the ring, not each term: modular addition makes a single term's
wrap-around harmless. A sum that leaves ``[-2**(bits-1), 2**(bits-1))`` wraps to the other end and
cannot be told apart from a legitimate sum; :func:`fedcore.privacy.distributed_plan.plan_distributed`
chooses ``gamma`` so that this happens with probability at most its ``clip_target`` (1e-10 by
default) per round. The server decodes (:func:`decode_sum`): signed integers, divided by
``gamma``, inverse rotation ``D H y / sqrt(d')``, unpadded; the result is the sum of the clipped
updates plus the noise, each coordinate moved by the rounding (unbiased apart from the
conditioning, which KLS21 show is small).

The Poisson sampler (:func:`poisson`) is exact up to float64 arithmetic: below mean 10, inversion
of a precomputed cumulative table with 53-bit uniforms; from 10 up, the transformed rejection with
squeeze of Hormann ("The transformed rejection method for generating Poisson random variables",
Insurance: Mathematics and Economics 12, 1993; PTRS, as numpy implements it), vectorised: about
1.15 candidates a draw, nine in ten accepted by the squeeze without a logarithm.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import scipy.special

from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError, LocalProtocolError
from fedcore.privacy.distributed import DistributedNoise, padded_dim, rounded_l2_bound
from fedcore.privacy.distributed_plan import DEFAULT_BETA, DistributedPlan
from fedcore.privacy.noise import discrete_gaussian
from fedcore.privacy.transforms import clip_to_norm
from fedcore.secagg.config import MAX_BITS, MIN_BITS
from fedcore.secagg.encoding import from_ring, stochastic_round, to_ring

ROTATION_PURPOSE = "fedcore.distributed-dp.rotation-signs"
ROUNDING_PURPOSE = "fedcore.distributed-dp.rounding"
NOISE_PURPOSE = "fedcore.distributed-dp.noise"
MAX_ATTEMPTS = 64  # conditional rounding tries before a site refuses (beta**64 < 1e-13 at e^-1/2)
_FACTOR_BITS = 5  # the Hadamard transform as Kronecker factors of 32 x 32 matrices
_PASS = 1 << 16  # Poisson candidates per sampler pass (their temporaries stay in cache)
_PTRS_FROM = 10.0  # mean from which PTRS is used (Hormann 1993 gives it for mean >= 10)
_SIGNS = np.array([1.0, -1.0])
_SIGNS32 = _SIGNS.astype(np.float32)
_SIGNS.flags.writeable = _SIGNS32.flags.writeable = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DistributedEncoding:
    """What a site needs to encode and the server to decode: the update's length ``dim``, the
    L2 ``clip_norm``, the scale ``gamma`` (grid step ``1 / gamma``), the ring's ``bits``, the
    rounding's ``beta`` and ``max_attempts``, and one site's noise share ``site_noise`` in grid
    units (``sigma`` for DDGauss, the variance ``mu`` for Skellam). ConfigError for bad values."""

    noise: DistributedNoise
    dim: int
    clip_norm: float
    gamma: float
    site_noise: float
    bits: int
    beta: float = DEFAULT_BETA
    max_attempts: int = MAX_ATTEMPTS

    def __post_init__(self) -> None:
        if not isinstance(self.noise, DistributedNoise):
            raise ConfigError(f"noise must be a DistributedNoise, got {self.noise!r}")
        if isinstance(self.bits, bool) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(
                f"dp.distributed.bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}"
            )
        for name in ("clip_norm", "gamma", "site_noise"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value > 0)
            ):
                raise ConfigError(f"{name} must be finite and > 0, got {value!r}")
        if (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or (self.max_attempts < 1)
        ):
            raise ConfigError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        if not self.rounding_bound < 2.0**52:  # also validates dim and beta
            # The norm check sums squares in float64: exact integers need magnitudes below 2**53.
            raise ConfigError(
                f"gamma * clip_norm = {self.gamma * self.clip_norm:.3g} grid steps is too fine "
                "for the rounding's norm check (at most 2**52)"
            )

    @classmethod
    def from_plan(cls, plan: DistributedPlan) -> DistributedEncoding:
        """The encoding :func:`~fedcore.privacy.distributed_plan.plan_distributed` chose."""
        return cls(
            noise=plan.noise,
            dim=plan.dim,
            clip_norm=plan.clip_norm,
            gamma=plan.gamma,
            site_noise=plan.site_noise,
            bits=plan.bits,
            beta=plan.beta,
        )

    @property
    def padded_dim(self) -> int:
        """``d'``: the number of ring elements a site sends."""
        return padded_dim(self.dim)

    @property
    def rounding_bound(self) -> float:
        """``Delta_2``: the L2 norm every rounded vector is held to (grid units)."""
        return rounded_l2_bound(
            scaled_norm=self.gamma * self.clip_norm, dim=self.padded_dim, beta=self.beta
        )


# ----------------------------------------------------------------------------- rotation


@functools.lru_cache(maxsize=16)
def _hadamard(size: int, *, single: bool = False) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.float32 if single else np.float64)
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    h.flags.writeable = False
    return h


@functools.cache
def _blas():  # noqa: ANN202 - threadpoolctl's selection of numpy's BLAS libraries
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def fwht(x: np.ndarray, *, dtype: type[np.floating] = np.float64) -> np.ndarray:
    """The normalised Walsh-Hadamard transform ``H x / sqrt(n)`` of a power-of-two length vector
    (its own inverse), as a copy. ``H_n`` is the Kronecker product of 32 x 32 blocks, one per axis
    of the vector seen as a ``32 x 32 x ...`` tensor: for each axis one matrix product applies its
    block in place of the axis (``H_f`` on ``(before, f, after)``), so ``log2(n) / 5`` BLAS calls
    and no transposes do the whole transform.

    BLAS runs on one thread meanwhile: products of 32 x 32 blocks gain nothing from a second one,
    and an OpenBLAS worker spinning for work cost up to seven times the CPU time (and wall time, on
    a shared machine) of the single-threaded transform. The limit is process-wide while it lasts
    (threadpoolctl), so another thread's BLAS call in that time runs single-threaded too.

    ``dtype`` is ``np.float64`` or ``np.float32`` (the site's rotation, :func:`clip_pad_rotate`).
    """
    if dtype not in (np.float64, np.float32):
        raise ConfigError(f"the Hadamard transform runs in float64 or float32, not {dtype!r}")
    y = np.asarray(x, dtype=dtype).reshape(-1)  # read only: each product makes a new array
    n = y.size
    if n == 0 or n & (n - 1):
        raise LocalProtocolError(f"the Hadamard transform needs a power-of-two length, got {n}")
    if n == 1:
        return y.copy()
    k = n.bit_length() - 1
    sizes = [_FACTOR_BITS] * (k // _FACTOR_BITS) + ([k % _FACTOR_BITS] if k % _FACTOR_BITS else [])
    before = 1
    with _blas().limit(limits=1):
        for bits in sizes:
            f = 1 << bits
            after = n // (before * f)
            h = _hadamard(f, single=dtype is np.float32)
            if after == 1:  # the last axis: one product with the (symmetric) block on the right
                y = y.reshape(before, f) @ h
            else:
                y = np.matmul(h, y.reshape(before, f, after))
            before *= f
    y = y.reshape(-1)
    y *= dtype(1.0 / math.sqrt(n))
    return y


def rotation_signs(
    size: int, *, seed: int | bytes, dtype: type[np.floating] = np.float64
) -> np.ndarray:
    """``size`` random signs (+-1 of ``dtype``, float64 or float32) from the public per-round
    ``seed``, one keystream bit each: the same for every site and the server of a round."""
    rng = CryptoRng.from_seed(seed, purpose=ROTATION_PURPOSE)
    bits = np.unpackbits(rng.fill(np.empty((size + 7) // 8, dtype=np.uint8)), count=size)
    signs = _SIGNS32 if dtype is np.float32 else _SIGNS
    return signs[bits]  # bit 0 -> +1, bit 1 -> -1: one gather instead of a cast and two passes


def rotate(x: np.ndarray, *, seed: int | bytes) -> np.ndarray:
    """``H D x / sqrt(d')`` for a vector of power-of-two length ``d'``."""
    v = np.asarray(x, dtype=np.float64)
    return fwht(v * rotation_signs(v.size, seed=seed))


def unrotate(y: np.ndarray, *, seed: int | bytes) -> np.ndarray:
    """The inverse of :func:`rotate`: ``D H y / sqrt(d')`` (``H D`` scaled is orthonormal)."""
    out = fwht(y)
    out *= rotation_signs(out.size, seed=seed)
    return out


# ----------------------------------------------------------------------------- the site's chain


def clip_pad_rotate(
    update: np.ndarray, *, encoding: DistributedEncoding, seed: int | bytes
) -> np.ndarray:
    """Steps 1 and 2: the update clipped to ``clip_norm``, padded to ``d'`` and rotated, as float64.

    The rotation runs in float32: three times faster than in float64 at ``d' = 2**20``, and its
    error (about ``1e-7`` of ``||x||`` per coordinate, ``1e-6`` grid steps at the planned ``gamma``)
    is far below the rounding that follows (half a grid step). The privacy guarantee does not
    depend on it: the rounded integers' norm is checked (:func:`conditional_round`), and the
    server's decode (:func:`decode_sum`) runs in float64.

    Raises LocalProtocolError for an update that is not a 1-D finite float vector of length
    ``encoding.dim``.
    """
    x = np.asarray(update)
    if x.shape != (encoding.dim,) or x.dtype.kind != "f":
        raise LocalProtocolError(
            f"update must be a float vector of shape ({encoding.dim},), got {x.dtype} {x.shape}"
        )
    if not np.all(np.isfinite(x)):
        raise LocalProtocolError("update holds NaN or infinite values")
    padded = np.zeros(encoding.padded_dim, dtype=np.float32)
    padded[: encoding.dim] = clip_to_norm([x], clip_norm=encoding.clip_norm).value[0]
    padded *= rotation_signs(padded.size, seed=seed, dtype=np.float32)
    return fwht(padded, dtype=np.float32).astype(np.float64)


def conditional_round(
    z: np.ndarray, *, bound: float, rng: CryptoRng, max_attempts: int = MAX_ATTEMPTS
) -> np.ndarray:
    """Stochastic rounding of ``z`` to int64, retried until ``||v||_2 <= bound`` (KLS21 Sec. 4).

    The squared norm is summed in float64 and accepted only below ``bound^2 (1 - (d + 4) 2**-52)``:
    the summation's error is below ``(d + 1) 2**-53`` of the sum, so an accepted vector's exact
    norm is within ``bound``. Raises LocalProtocolError after ``max_attempts`` failed tries (and
    as :func:`~fedcore.secagg.encoding.stochastic_round` does for non-finite or huge values).
    """
    limit = bound * bound * (1.0 - (z.size + 4) * 2.0**-52)
    for _ in range(max_attempts):
        v = stochastic_round(z, rng=rng)
        f = v.astype(np.float64)
        if float(np.dot(f, f)) <= limit:
            return v
    raise LocalProtocolError(
        f"conditional rounding failed {max_attempts} times to stay within norm {bound:.6g}; "
        "nothing was sent"
    )


def poisson(n: int, *, lam: float, rng: CryptoRng) -> np.ndarray:
    """``n`` independent Poisson(``lam``) draws (int64), every coin from ``rng`` (module
    docstring: inversion below mean 10, PTRS from 10). ConfigError for a bad ``lam``."""
    if (
        isinstance(lam, bool)
        or not isinstance(lam, int | float)
        or not (math.isfinite(lam) and 0 < lam <= 2.0**50)
    ):
        raise ConfigError(f"Poisson mean must be in (0, 2**50], got {lam!r}")
    if not isinstance(rng, CryptoRng):
        raise ConfigError(f"noise must come from a CryptoRng, got {type(rng).__name__}")
    if lam < _PTRS_FROM:
        return _poisson_inversion(n, float(lam), rng)
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        kept = _ptrs_pass(min(_PASS, int((n - filled) * 1.15) + 16), float(lam), rng)
        kept = kept[: n - filled]
        out[filled : filled + kept.size] = kept
        filled += kept.size
    return out


def _poisson_inversion(n: int, lam: float, rng: CryptoRng) -> np.ndarray:
    # P[X > 80] < 1e-40 for lam < 10: far below the uniforms' resolution of 2**-53.
    k = np.arange(81, dtype=np.float64)
    pmf = np.exp(k * math.log(lam) - lam - scipy.special.gammaln(k + 1.0))
    cdf = np.cumsum(pmf)
    cdf[-1] = 1.0  # 1 - cdf[-1] lies below 1e-40: the last cell takes the rounding
    return np.searchsorted(cdf, rng.uniform(n), side="right").astype(np.int64)


def _ptrs_pass(batch: int, lam: float, rng: CryptoRng) -> np.ndarray:
    """One vectorised pass of PTRS (Hormann 1993, Alg. PTRS, numpy's constants) over ``batch``
    candidates; the accepted ones, in candidate order."""
    slam, loglam = math.sqrt(lam), math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2.0)
    words = rng.uint64(2 * batch)
    words >>= np.uint64(11)
    uv = words.astype(np.float64)
    uv *= 2.0**-53
    u, v = uv[:batch] - 0.5, uv[batch:]
    us = 0.5 - np.abs(u)
    with np.errstate(divide="ignore", invalid="ignore"):  # us = 0 gives k = -inf: rejected
        k = np.floor((2.0 * a / us + b) * u + lam + 0.43)
    quick = (us >= 0.07) & (v <= vr)
    slow = ~quick & (k >= 0) & ~((us < 0.013) & (v > us))
    idx = np.flatnonzero(slow)
    ks, uss = k[idx], us[idx]
    with np.errstate(divide="ignore"):  # v = 0: log is -inf, accepted (probability 2**-53)
        lhs = np.log(v[idx]) + math.log(inv_alpha) - np.log(a / (uss * uss) + b)
    rhs = -lam + ks * loglam - scipy.special.gammaln(ks + 1.0)
    quick[idx[lhs <= rhs]] = True
    return k[quick].astype(np.int64)


def skellam(n: int, *, mu: float, rng: CryptoRng) -> np.ndarray:
    """``n`` draws of Skellam: Poisson(mu/2) - Poisson(mu/2), variance ``mu`` (int64)."""
    if (
        isinstance(mu, bool)
        or not isinstance(mu, int | float)
        or not (math.isfinite(mu) and mu > 0)
    ):
        raise ConfigError(f"Skellam variance must be finite and > 0, got {mu!r}")
    both = poisson(2 * n, lam=mu / 2.0, rng=rng)
    return both[:n] - both[n:]


def draw_noise(n: int, *, encoding: DistributedEncoding, rng: CryptoRng) -> np.ndarray:
    """One site's noise share for ``n`` coordinates (int64), from ``rng``."""
    if encoding.noise is DistributedNoise.DGAUSS:
        return discrete_gaussian(n, sigma=encoding.site_noise, rng=rng)
    return skellam(n, mu=encoding.site_noise, rng=rng)


def encode_site(
    update: np.ndarray,
    *,
    encoding: DistributedEncoding,
    rotation_seed: int | bytes,
    seed: int | bytes | None = None,
) -> np.ndarray:
    """A site's update as ``d'`` ring elements: clip, pad, rotate, scale, round, noise, reduce.

    ``rotation_seed`` is the round's public seed. ``seed`` is for tests only: the rounding coins
    and the noise then come from ``CryptoRng.from_seed(seed, purpose=ROUNDING_PURPOSE)`` and
    ``(seed, purpose=NOISE_PURPOSE)``; by default from two generators keyed by ``os.urandom``.
    Raises LocalProtocolError for a malformed update or a rounding that fails ``max_attempts``
    times; nothing is returned then.
    """
    if seed is None:
        rounding_rng, noise_rng = CryptoRng(), CryptoRng()
    else:
        rounding_rng = CryptoRng.from_seed(seed, purpose=ROUNDING_PURPOSE)
        noise_rng = CryptoRng.from_seed(seed, purpose=NOISE_PURPOSE)
    z = clip_pad_rotate(update, encoding=encoding, seed=rotation_seed)
    z *= encoding.gamma
    v = conditional_round(
        z, bound=encoding.rounding_bound, rng=rounding_rng, max_attempts=encoding.max_attempts
    )
    v += draw_noise(v.size, encoding=encoding, rng=noise_rng)
    return to_ring(v, bits=encoding.bits)


# ----------------------------------------------------------------------------- the server's decode


def decode_sum(
    total: np.ndarray, *, encoding: DistributedEncoding, rotation_seed: int | bytes
) -> np.ndarray:
    """The unmasked sum of the sites' ring vectors, decoded: signed, divided by ``gamma``, rotated
    back and unpadded, as float64 of length ``dim`` (the sum of the clipped updates plus noise).

    Raises LocalProtocolError when ``total`` is not ``d'`` ring elements (integers in
    ``0..2**bits - 1``). A sum that left the ring is not detected (module docstring).
    """
    v = np.asarray(total)
    if v.shape != (encoding.padded_dim,) or v.dtype.kind not in "ui":
        raise LocalProtocolError(
            f"a sum of encoded updates has shape ({encoding.padded_dim},) of ring integers, "
            f"got {v.dtype} {v.shape}"
        )
    if v.size and (int(v.min()) < 0 or int(v.max()) >> encoding.bits):
        raise LocalProtocolError(
            f"a sum of encoded updates has entries outside the ring Z/2**{encoding.bits}"
        )
    signed = from_ring(v, bits=encoding.bits).astype(np.float64)
    signed *= 1.0 / encoding.gamma
    return unrotate(signed, seed=rotation_seed)[: encoding.dim]
