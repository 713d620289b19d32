"""t-out-of-n Shamir secret sharing of 32-byte secrets over the prime field GF(2**256 + 297).

Theory of operation (Shamir, "How to share a secret", CACM 1979): a secret s is the constant term
of a polynomial f of degree t - 1 whose other coefficients are uniform in the field; holder i gets
f(x_i). Any t points determine f by Lagrange interpolation, so f(0) = s; any t - 1 points are
consistent with every possible s with equal probability, so they reveal nothing (perfect secrecy).
The field's prime p = 2**256 + 297 (the least prime above 2**256) holds any 32-byte string
directly, so an X25519 private key or a mask seed is shared as it is, with no PEM wrapping and no
splitting into chunks. A share is an element below p: 33 bytes on the wire.

The x-coordinate of holder ``h`` (a client id, 0 <= h < 2**64 - 1, as Flower node ids) is
``h + 1``, never 0.

The coefficients come from the caller's generator (a CSPRNG: 48 random bytes reduced mod p, a bias
below 2**-128). Evaluation runs Horner's rule over all holders at once; interpolation caches the
Lagrange coefficients of a set of holders, because the server reconstructs every secret of a round
from the same survivors (Bonawitz et al., CCS 2017, section 7 discusses this cost).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError, InvalidMessage

PRIME = 2**256 + 297
SECRET_BYTES = 32
SHARE_BYTES = 33
_COEFF_BYTES = 48


def split(
    secrets: Sequence[bytes], *, holders: Sequence[int], threshold: int, rng: CryptoRng
) -> list[dict[int, int]]:
    """Share each 32-byte secret among ``holders``; return one ``{holder: share}`` per secret.

    Raises ConfigError when the threshold is not in 1..len(holders), a holder id is out of range
    or repeated, or a secret is not 32 bytes; nothing is drawn from ``rng`` in that case.
    """
    xs = _check(secrets, holders, threshold)
    out = []
    for s in secrets:
        values = _evaluate(_polynomial(s, threshold, rng), xs)
        out.append(dict(zip(holders, values, strict=True)))
    return out


def share_of(
    secrets: Sequence[bytes],
    *,
    holders: Sequence[int],
    threshold: int,
    rng: CryptoRng,
    holder: int,
) -> list[int]:
    """``[split(...)[i][holder] for each secret i]``, drawing exactly what :func:`split` draws
    from ``rng`` but evaluating each polynomial at ``holder`` only (a client replaying its own
    share-keys stage needs its own shares, not the ones it sealed for others).

    Raises what :func:`split` raises, and ConfigError when ``holder`` is not among ``holders``.
    """
    xs = _check(secrets, holders, threshold)
    if holder not in holders:
        raise ConfigError(f"holder {holder} is not among the {len(holders)} holders")
    x = xs[list(holders).index(holder)]
    return [_evaluate(_polynomial(s, threshold, rng), (x,))[0] for s in secrets]


def _check(secrets: Sequence[bytes], holders: Sequence[int], threshold: int) -> tuple[int, ...]:
    xs = _xs(holders)
    if not 1 <= threshold <= len(xs):
        raise ConfigError(f"threshold must be in 1..{len(xs)}, got {threshold}")
    for s in secrets:
        if len(s) != SECRET_BYTES:
            raise ConfigError(f"a secret must be {SECRET_BYTES} bytes, got {len(s)}")
    return xs


def _polynomial(secret: bytes, threshold: int, rng: CryptoRng) -> list[int]:
    """Coefficients from the constant term up: the secret, then t - 1 draws from ``rng``."""
    raw = rng.bytes(_COEFF_BYTES * (threshold - 1))
    coeffs = [
        int.from_bytes(raw[i : i + _COEFF_BYTES], "big") % PRIME
        for i in range(0, len(raw), _COEFF_BYTES)
    ]
    return [int.from_bytes(secret, "big"), *coeffs]


def _evaluate(poly: list[int], xs: Sequence[int]) -> list[int]:
    """f(x) for each x. Horner's rule from the top coefficient down,
    f(x) = (...(c_{t-1} x + c_{t-2}) x ...) + c_0, reducing modulo p once per step."""
    out = []
    top = poly[::-1]
    for x in xs:
        v = 0
        for c in top:
            v = (v * x + c) % PRIME
        out.append(v)
    return out


def reconstruct(shares: Mapping[int, int], *, threshold: int) -> bytes:
    """Rebuild a 32-byte secret from at least ``threshold`` ``{holder: share}`` entries.

    Uses the ``threshold`` lowest holder ids. Raises InvalidMessage when there are too few shares,
    a share is not a field element, or the result is not a 32-byte value (corrupted shares).
    """
    if threshold < 1:
        raise ConfigError(f"threshold must be >= 1, got {threshold}")
    if len(shares) < threshold:
        raise InvalidMessage(f"need {threshold} shares to reconstruct, got {len(shares)}")
    chosen = sorted(shares)[:threshold]
    xs = _xs(chosen)
    lam = lagrange_at_zero(xs)
    total = 0
    for holder, coeff in zip(chosen, lam, strict=True):
        y = shares[holder]
        if not 0 <= y < PRIME:
            raise InvalidMessage(f"share from holder {holder} is not a field element")
        total += coeff * y
    secret = total % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise InvalidMessage("shares do not interpolate to a 32-byte secret (corrupted share)")
    return secret.to_bytes(SECRET_BYTES, "big")


@functools.lru_cache(maxsize=256)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Coefficients l_i with f(0) = sum_i l_i f(x_i), l_i = prod_{j != i} x_j / (x_j - x_i)."""
    numerator = 1
    for x in xs:
        numerator = numerator * x % PRIME
    denominators = []
    for i, xi in enumerate(xs):
        d = xi  # divide out x_i from the full product below
        for j, xj in enumerate(xs):
            if j != i:
                d = d * (xj - xi) % PRIME
        denominators.append(d)
    inverses = _batch_inverse(denominators)
    return tuple(numerator * inv % PRIME for inv in inverses)


def _batch_inverse(values: list[int]) -> list[int]:
    """Montgomery's trick: all inverses for one modular exponentiation."""
    prefix = [1]
    for v in values:
        prefix.append(prefix[-1] * v % PRIME)
    inv = pow(prefix[-1], PRIME - 2, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = prefix[i] * inv % PRIME
        inv = inv * values[i] % PRIME
    return out


def _xs(holders: Sequence[int]) -> tuple[int, ...]:
    if len(set(holders)) != len(holders):
        raise ConfigError("holder ids must be distinct")
    if any(not 0 <= h < 2**64 - 1 for h in holders):
        raise ConfigError("holder ids must be in 0..2**64-2")
    return tuple(h + 1 for h in holders)
