"""CryptoRng: a known-answer keystream, determinism for a seed, uniformity, normal moments.

Tolerances are stated next to each check; seeds are fixed, so the checks are deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.crypto import CryptoRng, aes_ctr_keystream
from fedcore.errors import ConfigError


def test_keystream_matches_nist_sp800_38a_ctr_aes256() -> None:
    # NIST SP 800-38A, F.5.5 CTR-AES256.Encrypt, block #1: keystream = ciphertext XOR plaintext.
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    counter = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    plaintext = bytes.fromhex("6bc1bee22e409f96e93d7e117393172a")
    ciphertext = bytes.fromhex("601ec313775789a5b7a7f504bbf3d228")
    stream = aes_ctr_keystream(key, 16, nonce=counter)
    assert bytes(a ^ b for a, b in zip(stream, plaintext, strict=True)) == ciphertext


def test_same_seed_same_stream_and_purpose_separates() -> None:
    a = CryptoRng.from_seed(7, purpose="x").bytes(1000)
    b = CryptoRng.from_seed(7, purpose="x").bytes(1000)
    c = CryptoRng.from_seed(7, purpose="y").bytes(1000)
    d = CryptoRng.from_seed(8, purpose="x").bytes(1000)
    assert a == b
    assert a != c and a != d
    assert CryptoRng().bytes(32) != CryptoRng().bytes(32)  # OS-keyed: 2**-256 to fail


def test_stream_is_continuous_across_calls_and_chunks() -> None:
    whole = CryptoRng.from_seed(1).bytes(3 << 20)
    rng = CryptoRng.from_seed(1)
    parts = rng.bytes(5) + rng.bytes((1 << 20) + 3) + rng.bytes((3 << 20) - (1 << 20) - 8)
    assert parts == whole


def test_bytes_are_uniform() -> None:
    data = np.frombuffer(CryptoRng.from_seed(2).bytes(256 * 400), dtype=np.uint8)
    counts = np.bincount(data, minlength=256)
    chi2 = float(((counts - 400) ** 2 / 400).sum())
    assert chi2 < 400  # 255 dof: mean 255, sd 22.6; 400 is 6.4 sd


def test_uniform_floats() -> None:
    u = CryptoRng.from_seed(3).uniform(200_000)
    assert u.min() >= 0.0 and u.max() < 1.0
    # mean 1/2 (sd of the mean 0.000645), variance 1/12; 6 sd bands
    assert abs(u.mean() - 0.5) < 0.0039
    assert abs(u.var() - 1 / 12) < 0.0012
    hist, _ = np.histogram(u, bins=20, range=(0, 1))
    chi2 = float(((hist - 10_000) ** 2 / 10_000).sum())
    assert chi2 < 60  # 19 dof: mean 19, sd 6.2


def test_standard_normal_moments() -> None:
    n = 400_000
    z = CryptoRng.from_seed(4).standard_normal(n)
    assert z.shape == (n,)
    # Tolerances: 6 standard errors. mean: 1/sqrt(n) = 0.00158; variance: sqrt(2/n) = 0.00224;
    # skewness: sqrt(6/n) = 0.0039; excess kurtosis: sqrt(24/n) = 0.0077.
    assert abs(z.mean()) < 0.0095
    assert abs(z.var() - 1) < 0.0134
    zc = z - z.mean()
    assert abs((zc**3).mean() / z.std() ** 3) < 0.023
    assert abs((zc**4).mean() / z.var() ** 2 - 3) < 0.046
    # tails: P(|Z| > 3) = 0.0026998, binomial sd over n draws is 8.2e-5
    assert abs((np.abs(z) > 3).mean() - 0.0026998) < 0.0005
    assert np.isfinite(z).all()
    assert CryptoRng.from_seed(4).standard_normal(7).shape == (7,)


def test_normal_scales_and_validates() -> None:
    z = CryptoRng.from_seed(5).normal(100_000, std=3.0)
    assert abs(z.std() - 3.0) < 0.06  # 6 * 3 * sqrt(1/(2n))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError):
            CryptoRng.from_seed(5).normal(3, std=bad)


@pytest.mark.parametrize("bits", [1, 7, 32, 63, 64])
def test_integers_below_pow2(bits: int) -> None:
    x = CryptoRng.from_seed(bits).integers_below_pow2(50_000, bits)
    assert x.dtype == np.uint64
    if bits < 64:
        assert int(x.max()) < (1 << bits)
    top = (x >> np.uint64(bits - 1)) & np.uint64(1)
    assert abs(int(top.sum()) - 25_000) < 700  # sd 112


def test_bad_keys_and_bits() -> None:
    with pytest.raises(ConfigError):
        CryptoRng(b"short")
    with pytest.raises(ConfigError):
        CryptoRng.from_seed(0).integers_below_pow2(3, 65)
    with pytest.raises(ConfigError):
        aes_ctr_keystream(b"short", 4)
