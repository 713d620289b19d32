"""The distributed-DP encoding (fedcore.mechanisms.distributed_encoding): exact sums, rotation,
conditional rounding, the ring's edge, and the noise samplers against their targets (seeded)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError, LocalProtocolError
from fedcore.mechanisms.distributed_encoding import (
    NOISE_PURPOSE,
    ROUNDING_PURPOSE,
    DistributedEncoding,
    clip_pad_rotate,
    conditional_round,
    decode_sum,
    draw_noise,
    encode_site,
    fwht,
    poisson,
    rotate,
    rotation_signs,
    skellam,
    unrotate,
)
from fedcore.privacy.distributed import DistributedNoise
from fedcore.privacy.distributed_plan import plan_distributed
from fedcore.secagg.encoding import from_ring, to_ring

ROTATION_SEED = b"round 7 of session 0xfeed"


def _encoding(noise: DistributedNoise, **changes: object) -> DistributedEncoding:
    fields: dict[str, object] = {
        "noise": noise,
        "dim": 1000,
        "clip_norm": 2.0,
        "gamma": 512.0,
        "site_noise": 3.0 if noise is DistributedNoise.DGAUSS else 9.0,
        "bits": 32,
    }
    fields.update(changes)
    return DistributedEncoding(**fields)  # type: ignore[arg-type]


def _ring_sum(vectors: list[np.ndarray], bits: int) -> np.ndarray:
    total = np.zeros(vectors[0].size, dtype=np.uint64)
    for v in vectors:
        total += v.astype(np.uint64)
    return total & np.uint64((1 << bits) - 1)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 128, 512, 1 << 13])  # 32 x 32 blocks and remainders
def test_the_hadamard_transform_is_the_matrix_and_its_own_inverse(n: int) -> None:
    x = CryptoRng.from_seed(n).standard_normal(n)
    if n <= 512:
        expected = scipy.linalg.hadamard(n) @ x / math.sqrt(n)
        assert np.allclose(fwht(x), expected, rtol=0, atol=1e-12 * math.sqrt(n))
    assert np.allclose(fwht(fwht(x)), x, rtol=0, atol=1e-12)
    rotated = rotate(x, seed=ROTATION_SEED)
    assert np.linalg.norm(rotated) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    assert np.allclose(unrotate(rotated, seed=ROTATION_SEED), x, rtol=0, atol=1e-12)
    with pytest.raises(LocalProtocolError, match="power-of-two"):
        fwht(np.ones(3 * n))


def test_the_hadamard_transform_leaves_its_input_and_blas_threads_as_they_were() -> None:
    from threadpoolctl import threadpool_info

    before = [(i["prefix"], i["num_threads"]) for i in threadpool_info()]
    for n in (1, 2, 1 << 11, 1 << 15):
        x = CryptoRng.from_seed(n).standard_normal(n)
        kept = x.copy()
        y = fwht(x)
        assert np.array_equal(x, kept)  # a copy: the input is never written
        assert not np.shares_memory(x, y)
        y[:] = 0.0
        assert np.array_equal(x, kept)
    # One BLAS thread only while the transform runs: the process's setting is restored after.
    assert [(i["prefix"], i["num_threads"]) for i in threadpool_info()] == before


def test_the_sites_float32_rotation_is_the_float64_one_within_a_millionth_of_a_grid_step() -> None:
    # The site rotates in float32 (three times faster at 2**20); against the float64 transform
    # its error is far below the half grid step of the rounding that follows.
    enc = _encoding(DistributedNoise.DGAUSS, dim=3000, gamma=4096.0, clip_norm=1.0)
    u = CryptoRng.from_seed(5).standard_normal(enc.dim)
    z = clip_pad_rotate(u, encoding=enc, seed=ROTATION_SEED)
    padded = np.zeros(enc.padded_dim)
    padded[: enc.dim] = u * (enc.clip_norm / np.linalg.norm(u))
    exact = rotate(padded, seed=ROTATION_SEED)
    assert z.dtype == np.float64 and z.shape == exact.shape
    assert np.max(np.abs(z - exact)) * enc.gamma < 1e-3
    assert np.linalg.norm(z) == pytest.approx(enc.clip_norm, rel=1e-6)
    x = CryptoRng.from_seed(6).standard_normal(1 << 12)
    single = fwht(x, dtype=np.float32)
    assert single.dtype == np.float32
    assert np.allclose(single, fwht(x), rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="float64 or float32"):
        fwht(x, dtype=np.float16)


def test_rotation_signs_are_the_keystream_bits() -> None:
    # bit 0 -> +1, bit 1 -> -1, in keystream order (np.unpackbits: most significant bit first)
    from fedcore.mechanisms.distributed_encoding import ROTATION_PURPOSE

    rng = CryptoRng.from_seed(ROTATION_SEED, purpose=ROTATION_PURPOSE)
    raw = rng.fill(np.empty(13, dtype=np.uint8))
    bits = np.unpackbits(raw, count=100).astype(np.float64)
    assert np.array_equal(rotation_signs(100, seed=ROTATION_SEED), 1.0 - 2.0 * bits)


def test_rotation_signs_are_public_and_per_round() -> None:
    signs = rotation_signs(4096, seed=ROTATION_SEED)
    assert set(np.unique(signs)) == {-1.0, 1.0}
    assert np.array_equal(signs, rotation_signs(4096, seed=ROTATION_SEED))
    assert not np.array_equal(signs, rotation_signs(4096, seed=b"round 8"))
    assert abs(signs.sum()) < 4 * math.sqrt(4096)
    # The rotation flattens a spike: every coordinate gets |x| / sqrt(d').
    spike = np.zeros(4096)
    spike[17] = 3.0
    assert np.allclose(np.abs(rotate(spike, seed=ROTATION_SEED)), 3.0 / 64)


def test_conditional_rounding_keeps_its_norm_bound() -> None:
    rng = CryptoRng.from_seed(11)
    enc = _encoding(DistributedNoise.DGAUSS, gamma=40.0)
    bound = enc.rounding_bound
    z = rng.standard_normal(enc.padded_dim)
    z *= enc.gamma * enc.clip_norm / np.linalg.norm(z)
    for _ in range(20):
        v = conditional_round(z, bound=bound, rng=rng)
        assert np.all((v == np.floor(z)) | (v == np.ceil(z)))
        assert float(np.linalg.norm(v)) <= bound
    # A bound between the norms a try can reach forces retries and is still kept: about half of
    # the unconditional roundings pass it.
    norms = [float(np.linalg.norm(conditional_round(z, bound=1e9, rng=rng))) for _ in range(200)]
    median = float(np.median(norms))
    assert min(norms) < median < max(norms)
    for _ in range(20):
        assert float(np.linalg.norm(conditional_round(z, bound=median, rng=rng))) <= median
    with pytest.raises(LocalProtocolError, match="failed 5 times"):
        conditional_round(z, bound=min(norms) * 0.9, rng=rng, max_attempts=5)


@pytest.mark.parametrize("noise", list(DistributedNoise))
def test_the_decoded_sum_is_the_rounded_inputs_plus_the_noise_exactly(
    noise: DistributedNoise,
) -> None:
    enc = _encoding(noise)
    data = CryptoRng.from_seed(5)
    updates = [data.standard_normal(enc.dim) * s for s in (0.01, 0.05, 1.0, 0.2, 0.3)]
    sent = [encode_site(u, encoding=enc, rotation_seed=ROTATION_SEED, seed=i) for i, u in enumerate(updates)]  # fmt: skip
    assert all(s.dtype == np.uint32 and s.shape == (1024,) for s in sent)
    expected = np.zeros(enc.padded_dim, dtype=np.int64)
    clipped = np.zeros(enc.dim)
    for i, u in enumerate(updates):
        z = clip_pad_rotate(u, encoding=enc, seed=ROTATION_SEED) * enc.gamma
        v = conditional_round(
            z, bound=enc.rounding_bound, rng=CryptoRng.from_seed(i, purpose=ROUNDING_PURPOSE)
        )
        noise_share = draw_noise(
            enc.padded_dim, encoding=enc, rng=CryptoRng.from_seed(i, purpose=NOISE_PURPOSE)
        )
        assert np.count_nonzero(noise_share) > 0
        expected += v + noise_share
        clipped += u * min(1.0, enc.clip_norm / float(np.linalg.norm(u)))
    total = _ring_sum(sent, enc.bits)
    assert np.array_equal(from_ring(total, bits=enc.bits), expected)  # exact, in the integers
    decoded = decode_sum(total, encoding=enc, rotation_seed=ROTATION_SEED)
    assert decoded.shape == (enc.dim,)
    assert np.allclose(decoded, unrotate(expected / enc.gamma, seed=ROTATION_SEED)[: enc.dim])
    # And it estimates the clipped sum: the error is noise plus rounding, per coordinate about
    # sqrt(5 (share + 1/4)) / gamma.
    spread = math.sqrt(5 * (enc.site_noise**2 + 0.25)) / enc.gamma
    assert np.sqrt(np.mean((decoded - clipped) ** 2)) < 1.5 * spread


def test_single_terms_may_wrap_but_a_sum_outside_the_ring_is_not_detected() -> None:
    bits = 12  # signed range -2048..2047
    enc = _encoding(DistributedNoise.DGAUSS, bits=bits, dim=4)
    ints = [np.array([3000, -2040, 2047, 1500]), np.array([-2000, -3000, 0, 548])]
    sent = [to_ring(v, bits=bits) for v in ints]  # 3000 and -3000 wrap on their own
    total = _ring_sum(sent, bits)
    signed = from_ring(total, bits=bits)
    # Sums inside the ring, including both edges (-2048 is the most negative), come back exactly.
    assert signed[:3].tolist() == [1000, -5040 + 4096, 2047]
    # 1500 + 548 = 2048 has left the ring: it reads as -2048, indistinguishable from a real one.
    assert signed[3] == -2048
    decoded = decode_sum(total, encoding=enc, rotation_seed=ROTATION_SEED)
    assert np.allclose(decoded, unrotate(signed / enc.gamma, seed=ROTATION_SEED))
    # The planner keeps that chance below its target; a sum of in-ring terms at the edge is fine.
    edge = [to_ring(np.array([-1024, 1023, 0, 0]), bits=bits)] * 2
    assert from_ring(_ring_sum(edge, bits), bits=bits).tolist() == [-2048, 2046, 0, 0]


def test_noise_shares_have_their_target_mean_and_variance() -> None:
    rng = CryptoRng.from_seed(2024)
    n = 1 << 18
    # Tolerances: the sample mean within 5 standard errors; the variance within 3 per cent
    # (the sample variance's relative error is about sqrt(2 / n) = 0.3 per cent here).
    for sigma in (0.5, 3.0, 1000.0):
        x = draw_noise(n, encoding=_encoding(DistributedNoise.DGAUSS, site_noise=sigma), rng=rng)
        assert abs(x.mean()) < 5 * sigma / math.sqrt(n) + 1e-3
        k = np.arange(-int(40 * sigma) - 10, int(40 * sigma) + 11, dtype=np.float64)
        weight = np.exp(-k * k / (2 * sigma * sigma))
        var = float(np.sum(k * k * weight) / np.sum(weight))  # N_Z's variance: below sigma^2
        assert x.var() == pytest.approx(var, rel=0.03)
    for mu in (0.6, 3.0, 19.0, 50.0, 7e4, 3e9):
        x = skellam(n, mu=mu, rng=rng)
        assert x.dtype == np.int64
        assert abs(x.mean()) < 5 * math.sqrt(mu / n)
        assert x.var() == pytest.approx(mu, rel=0.03)


@pytest.mark.parametrize("lam", [0.7, 9.5, 10.0, 23.4, 150.0, 4096.0])
def test_poisson_matches_its_pmf(lam: float) -> None:
    # Below 10: table inversion; from 10: PTRS. A chi-square test against the exact pmf, cells
    # merged to an expected count of at least 20; seeded, so the p-value is fixed.
    n = 200_000
    x = poisson(n, lam=lam, rng=CryptoRng.from_seed(int(lam * 10)))
    assert x.min() >= 0
    lo, hi = int(scipy.stats.poisson.ppf(1e-6, lam)), int(scipy.stats.poisson.ppf(1 - 1e-6, lam))
    edges = np.arange(lo, hi + 2)
    probs = np.diff(scipy.stats.poisson.cdf(edges - 1, lam))
    probs[0] += scipy.stats.poisson.cdf(lo - 1, lam)
    probs[-1] += scipy.stats.poisson.sf(hi, lam)
    counts = np.bincount(np.clip(x, lo, hi) - lo, minlength=hi - lo + 1)
    obs, exp, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(counts, probs * n, strict=True):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 20:
            obs.append(acc_o)
            exp.append(acc_e)
            acc_o = acc_e = 0.0
    obs[-1] += acc_o
    exp[-1] += acc_e
    _, p = scipy.stats.chisquare(obs, exp)
    assert p > 1e-3


def test_a_wrong_sampler_is_caught_by_the_pmf_test() -> None:
    # Control: the same chi-square statistic rejects Poisson(10.3) draws read as Poisson(10).
    x = poisson(200_000, lam=10.3, rng=CryptoRng.from_seed(1))
    k = np.arange(0, 40)
    counts = np.bincount(np.clip(x, 0, 39), minlength=40)
    probs = scipy.stats.poisson.pmf(k, 10.0)
    probs[-1] += scipy.stats.poisson.sf(39, 10.0)
    keep = probs * x.size >= 20
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(probs[keep], probs[~keep].sum()) * x.size
    assert scipy.stats.chisquare(obs, exp)[1] < 1e-6


def test_the_draws_for_a_seed_are_pinned() -> None:
    # A stored digest of one site's ring vector (made by this code at its introduction): a change
    # in the order of coins, the rotation or the samplers shows here. The update is dyadic, small
    # and unclipped in d = 64 (1/sqrt(64) = 1/8), so every float step is exact whatever the BLAS
    # kernel's summation order: the digest is the same on every machine.
    digests = {}
    for noise in DistributedNoise:
        enc = _encoding(noise, dim=64, clip_norm=100.0, gamma=3.0)  # z = 3 m / 128: dyadic
        update = np.arange(-32, 32) / 16.0
        sent = encode_site(update, encoding=enc, rotation_seed=ROTATION_SEED, seed=99)
        digests[noise.value] = hashlib.sha256(sent.tobytes()).hexdigest()[:16]
    assert digests == PINNED


PINNED = {"dgauss": "304bc78b32d53b8e", "skellam": "15bba89f913eaf6d"}


def test_bad_inputs_are_refused() -> None:
    enc = _encoding(DistributedNoise.SKELLAM)
    with pytest.raises(LocalProtocolError, match="shape"):
        encode_site(np.zeros(999), encoding=enc, rotation_seed=1, seed=1)
    with pytest.raises(LocalProtocolError, match="NaN"):
        encode_site(np.full(1000, np.nan), encoding=enc, rotation_seed=1, seed=1)
    with pytest.raises(LocalProtocolError, match="float"):
        encode_site(np.zeros(1000, dtype=np.int64), encoding=enc, rotation_seed=1, seed=1)
    with pytest.raises(LocalProtocolError, match="shape"):
        decode_sum(np.zeros(1000, dtype=np.uint32), encoding=enc, rotation_seed=1)
    with pytest.raises(LocalProtocolError, match="outside the ring"):
        decode_sum(np.full(1024, 1 << 33, dtype=np.uint64), encoding=enc, rotation_seed=1)
    with pytest.raises(ConfigError, match="bits"):
        _encoding(DistributedNoise.SKELLAM, bits=4)
    with pytest.raises(ConfigError, match="gamma"):
        _encoding(DistributedNoise.SKELLAM, gamma=float("nan"))
    with pytest.raises(ConfigError, match="CryptoRng"):
        poisson(3, lam=20.0, rng=np.random.default_rng(0))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="Poisson mean"):
        poisson(3, lam=0.0, rng=CryptoRng.from_seed(0))


def test_an_encoding_from_a_plan_round_trips_a_federation() -> None:
    plan = plan_distributed(
        noise=DistributedNoise.SKELLAM, epsilon=8.0, delta=1e-5, rounds=1, sites=3, colluders=0,
        dropout_tolerance=0.0, bits=24, dim=3000, clip_norm=1.0,
    )  # fmt: skip
    enc = DistributedEncoding.from_plan(plan)
    assert enc.padded_dim == plan.padded_dim == 4096
    assert enc.rounding_bound == plan.l2_sensitivity
    data = CryptoRng.from_seed(8)
    updates = [data.standard_normal(3000) * 0.01 for _ in range(3)]
    total = _ring_sum(
        [encode_site(u, encoding=enc, rotation_seed=ROTATION_SEED) for u in updates], enc.bits
    )
    decoded = decode_sum(total, encoding=enc, rotation_seed=ROTATION_SEED)
    spread = math.sqrt(3 * (enc.site_noise + 0.25)) / enc.gamma
    assert np.sqrt(np.mean((decoded - sum(updates)) ** 2)) < 1.5 * spread
