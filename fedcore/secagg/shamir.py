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

Wrong shares (:func:`reconstruct_checked`). The server can check a rebuilt secret against public
data (a self-mask seed against the commitment in its owner's advert, a mask key against the
advertised public key), so a wrong share is caught; the question is only which holder sent it and
whether the good shares still suffice. The shares are a Reed-Solomon codeword: m shares of a degree
t - 1 polynomial correct up to e = floor((m - t) / 2) wrong ones by Berlekamp-Welch decoding
(Welch and Berlekamp, US patent 4,633,470, 1986; Gemmell and Sudan, IPL 1992, give the linear
system used here): find Q of degree < t + e and a monic E of degree e with
Q(x_i) = y_i E(x_i) for every share, then f = Q / E. Beyond e, the check itself decides: t-subsets are tried until one rebuilds a secret
the check accepts (at most ``max_subsets``; one wrong share among t + 1, which decoding cannot
place, takes t + 1 tries). Cost: nothing on the honest path (the t lowest holders, one check, as
before); with wrong shares, one Gauss-Jordan elimination of an m x (t + 2e) system over GF(p),
O(m^3) field operations (well under a second in Python at m = 100), per secret that needs it.
A wrong share that is never used (beyond the t the honest path takes) is never looked at.

Culprits are named on evidence only. The check admits exactly one secret s (it compares exact
bytes), so (0, s) is one more point of the codeword; the holders named are those off the
polynomial that decoding all m + 1 points finds within floor((m + 1 - t) / 2) errors, the only
polynomial through (0, s) that fits so many shares. Farther out, colluders can fit their shares
and t - 2 honest ones to a second polynomial through (0, s), and nothing tells which side lied:
the secret is still right, and nobody is named.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence

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


def reconstruct_checked(
    shares: Mapping[int, int],
    *,
    threshold: int,
    check: Callable[[bytes], None],
    max_subsets: int = 1024,
) -> tuple[bytes, frozenset[int]]:
    """The secret that ``check`` accepts, rebuilt from shares some of which may be wrong, and the
    holders whose shares do not lie on its polynomial (see the module docstring for the method).

    ``check(secret)`` raises InvalidMessage for a wrong secret. Returns at once, with no culprit,
    when the ``threshold`` lowest holders' shares pass the check. Raises InvalidMessage when no
    secret that passes the check can be found (too many wrong shares, or fewer than
    ``threshold``); nothing is changed.
    """
    if len(shares) < threshold:
        raise InvalidMessage(f"need {threshold} shares to reconstruct, got {len(shares)}")
    outside = frozenset(h for h, y in shares.items() if not 0 <= y < PRIME)
    usable = {h: y for h, y in shares.items() if h not in outside}
    if not outside:
        try:
            secret = reconstruct(usable, threshold=threshold)
            check(secret)
            return secret, frozenset()
        except InvalidMessage:
            pass
    holders = sorted(usable)
    if len(holders) < threshold:
        raise InvalidMessage(f"{len(holders)} shares are field elements; need {threshold}")
    fit = _Fit(holders, [usable[h] for h in holders], threshold, check)
    poly = _berlekamp_welch(fit.xs, fit.ys, threshold)
    found = fit.accept(poly) if poly is not None else None
    if found is None:
        found = _search_subsets(fit, max_subsets)
    if found is None:
        raise InvalidMessage(
            f"no {threshold} of the {len(shares)} shares rebuild a secret that passes its check"
        )
    return found, fit.culprits(found) | outside


class _Fit:
    """The field-element shares being decoded, and the test a candidate polynomial must pass."""

    def __init__(
        self, holders: list[int], ys: list[int], threshold: int, check: Callable[[bytes], None]
    ) -> None:
        self.holders, self.ys, self.threshold, self.check = holders, ys, threshold, check
        self.xs = _xs(holders)

    def secret_of(self, value: int) -> bytes | None:
        """``value`` as a secret if it is one and passes the check, else None."""
        if value >> (8 * SECRET_BYTES):
            return None
        secret = value.to_bytes(SECRET_BYTES, "big")
        try:
            self.check(secret)
        except InvalidMessage:
            return None
        return secret

    def off(self, poly: list[int]) -> frozenset[int]:
        """The holders whose share is not on ``poly``."""
        pairs = zip(self.holders, self.ys, _evaluate(poly, self.xs), strict=True)
        return frozenset(h for h, y, f in pairs if y != f)

    def accept(self, poly: list[int]) -> bytes | None:
        """The secret f(0), if it passes the check and at least t holders lie on f."""
        secret = self.secret_of(poly[0] % PRIME if poly else 0)
        if secret is None or len(self.holders) - len(self.off(poly)) < self.threshold:
            return None
        return secret

    def culprits(self, secret: bytes) -> frozenset[int]:
        """The holders whose share is off the one polynomial that the exact ``secret`` and the
        shares determine, or nobody when no polynomial is determined (see the module docstring).

        The check admits one secret, so (0, secret) is one more point of the codeword: decoding
        the m + 1 points corrects e = floor((m + 1 - t) / 2) errors, and a polynomial within that
        distance is the only one through (0, secret) fitting that many shares. Beyond it, two
        polynomials through the secret may each fit t shares (colluders can fit theirs to a
        second one) and nothing says which holders lied: nobody is named."""
        xs, ys = (0, *self.xs), [int.from_bytes(secret, "big"), *self.ys]
        e = (len(xs) - self.threshold) // 2
        poly = _berlekamp_welch(xs, ys, self.threshold)
        if poly is None or _evaluate(poly, (0,))[0] != ys[0]:
            return frozenset()  # e = 0 (no redundancy), or too many wrong shares to tell
        bad = self.off(poly)
        return bad if len(bad) <= e else frozenset()


def _search_subsets(fit: _Fit, max_subsets: int) -> bytes | None:
    """Try up to ``max_subsets`` t-subsets of the shares: the first whose interpolation passes
    the check and fits at least t holders."""
    t = fit.threshold
    subsets = itertools.islice(itertools.combinations(range(len(fit.holders)), t), max_subsets)
    for chosen in subsets:
        sub_xs = tuple(fit.xs[i] for i in chosen)
        lam = lagrange_at_zero(sub_xs)
        value = sum(c * fit.ys[i] for c, i in zip(lam, chosen, strict=True)) % PRIME
        if fit.secret_of(value) is None:
            continue
        coeffs = _solve([_powers(x, t) for x in sub_xs], [fit.ys[i] for i in chosen])
        if coeffs is not None and (found := fit.accept(coeffs)) is not None:
            return found
    return None


def _powers(x: int, count: int) -> list[int]:
    out, v = [], 1
    for _ in range(count):
        out.append(v)
        v = v * x % PRIME
    return out


def _berlekamp_welch(xs: Sequence[int], ys: Sequence[int], threshold: int) -> list[int] | None:
    """f of degree < t agreeing with all but at most e = (m - t) // 2 points, or None."""
    e = (len(xs) - threshold) // 2
    if e == 0:
        return None
    rows, rhs = [], []
    for x, y in zip(xs, ys, strict=True):
        p = _powers(x, threshold + e + 1)
        # Q(x) - y (E(x) - x^e) = y x^e, unknowns: Q's t + e coefficients, E's e lower ones
        rows.append(p[: threshold + e] + [(-y * p[j]) % PRIME for j in range(e)])
        rhs.append(y * p[e] % PRIME)
    solution = _solve(rows, rhs)
    if solution is None:
        return None
    q, err = solution[: threshold + e], [*solution[threshold + e :], 1]
    quotient, remainder = _divide(q, err)
    if any(remainder):
        return None
    return quotient


def _divide(num: list[int], den: list[int]) -> tuple[list[int], list[int]]:
    """num / den over GF(p) for a monic ``den`` (coefficients lowest first): quotient, remainder."""
    num = list(num)
    d = len(den) - 1
    if len(num) <= d:
        return [0], num
    quotient = [0] * (len(num) - d)
    for i in range(len(num) - 1 - d, -1, -1):
        c = num[i + d] % PRIME
        quotient[i] = c
        if c:
            for j in range(d + 1):
                num[i + j] = (num[i + j] - c * den[j]) % PRIME
    return quotient, num[:d]


def _solve(rows: list[list[int]], rhs: list[int]) -> list[int] | None:
    """One solution of rows . x = rhs over GF(p) (free unknowns 0) by Gauss-Jordan, or None."""
    cols = len(rows[0]) if rows else 0
    a = [[v % PRIME for v in row] + [b % PRIME] for row, b in zip(rows, rhs, strict=True)]
    pivots: list[int] = []
    r = 0
    for c in range(cols):
        pivot = next((i for i in range(r, len(a)) if a[i][c]), None)
        if pivot is None:
            continue
        a[r], a[pivot] = a[pivot], a[r]
        inv = pow(a[r][c], PRIME - 2, PRIME)
        a[r] = [v * inv % PRIME for v in a[r]]
        for i in range(len(a)):
            if i != r and a[i][c]:
                f = a[i][c]
                a[i] = [(vi - f * vr) % PRIME for vi, vr in zip(a[i], a[r], strict=True)]
        pivots.append(c)
        r += 1
        if r == len(a):
            break
    if any(a[i][-1] for i in range(r, len(a))):
        return None
    x = [0] * cols
    for i, c in enumerate(pivots):
        x[c] = a[i][-1]
    return x
