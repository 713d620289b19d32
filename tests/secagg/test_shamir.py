"""Shamir sharing: any t shares rebuild the secret, t - 1 do not."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.crypto import CryptoRng
from fedcore.errors import ConfigError, InvalidMessage
from fedcore.secagg import shamir


def test_the_field_prime_is_prime_and_holds_32_bytes() -> None:
    p = shamir.PRIME
    assert p > 2**256
    # Miller-Rabin with 40 fixed random bases: a composite passes with probability < 4**-40.
    d, s = p - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    bases = random.Random(0).sample(range(2, 10**9), 40)
    for a in bases:
        x = pow(a, d, p)
        if x in (1, p - 1):
            continue
        for _ in range(s - 1):
            x = x * x % p
            if x == p - 1:
                break
        else:
            pytest.fail(f"{a} witnesses that the prime is composite")
    # and it is the least prime above 2**256: every odd number below it fails Fermat's test to
    # base 3 (base 2 would not do: 2**256 + 1 is a Fermat number, a base-2 pseudoprime)
    assert all(pow(3, m - 1, m) != 1 for m in range(2**256 + 1, p, 2))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    secret=st.binary(min_size=32, max_size=32),
    n=st.integers(2, 12),
    data=st.data(),
)
def test_any_t_shares_rebuild_and_t_minus_one_do_not(secret: bytes, n: int, data) -> None:  # type: ignore[no-untyped-def]
    t = data.draw(st.integers(2, n))
    holders = data.draw(st.lists(st.integers(0, 2**64 - 2), min_size=n, max_size=n, unique=True))
    (shares,) = shamir.split([secret], holders=holders, threshold=t, rng=CryptoRng.from_seed(n))
    chosen = data.draw(st.lists(st.sampled_from(holders), min_size=t, max_size=t, unique=True))
    assert shamir.reconstruct({h: shares[h] for h in chosen}, threshold=t) == secret
    fewer = {h: shares[h] for h in chosen[:-1]}
    with pytest.raises(InvalidMessage):
        shamir.reconstruct(fewer, threshold=t)
    # interpolating t - 1 points as if they were enough lands elsewhere (t - 1 reveal nothing)
    try:
        wrong = shamir.reconstruct(fewer, threshold=t - 1)
    except InvalidMessage:
        return
    assert wrong != secret


def test_t_minus_one_shares_are_uniform_whatever_the_secret() -> None:
    """t = 2: one share alone is s + c*x with c uniform, so its low byte is uniform for any s.
    Chi-square over 256 cells with 3000 draws: 255 degrees of freedom, mean 255, sd 22.6;
    the bound 400 is 6.4 sd out (a constant share would score about 765,000)."""
    for secret in (bytes(32), b"\xff" * 32):
        rng = CryptoRng.from_seed(secret[:1], purpose="tests.shamir.uniform")
        counts = [0] * 256
        for _ in range(3000):
            (shares,) = shamir.split([secret], holders=[10, 20], threshold=2, rng=rng)
            counts[shares[10] & 0xFF] += 1
        expected = 3000 / 256
        chi2 = sum((c - expected) ** 2 / expected for c in counts)
        assert chi2 < 400, chi2


def test_split_validates_its_arguments() -> None:
    rng = CryptoRng.from_seed(0)
    with pytest.raises(ConfigError):
        shamir.split([bytes(32)], holders=[1, 1, 2], threshold=2, rng=rng)
    with pytest.raises(ConfigError):
        shamir.split([bytes(32)], holders=[1, 2], threshold=3, rng=rng)
    with pytest.raises(ConfigError):
        shamir.split([bytes(31)], holders=[1, 2], threshold=2, rng=rng)
    with pytest.raises(ConfigError):
        shamir.split([bytes(32)], holders=[-1, 2], threshold=2, rng=rng)


def test_shares_outside_the_field_are_refused() -> None:
    with pytest.raises(InvalidMessage):
        shamir.reconstruct({1: shamir.PRIME, 2: 5}, threshold=2)


def test_lagrange_coefficients_interpolate_a_known_polynomial() -> None:
    # f(x) = 7 + 3x + 2x^2 over the field
    xs = (2, 5, 9)
    ys = [(7 + 3 * x + 2 * x * x) % shamir.PRIME for x in xs]
    lam = shamir.lagrange_at_zero(xs)
    assert sum(l_i * y for l_i, y in zip(lam, ys, strict=True)) % shamir.PRIME == 7
