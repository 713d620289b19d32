"""Float updates to the ring and back: error within the bound, exact weights, typed refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.crypto import CryptoRng
from fedcore.errors import ConfigError, LocalProtocolError
from fedcore.secagg import aggregate_in_memory
from fedcore.secagg.encoding import (
    EncodingConfig,
    decode_mean,
    encode_update,
    from_ring,
    stochastic_round,
    to_ring,
)


def _sum(vectors: list[np.ndarray], bits: int) -> np.ndarray:
    total = np.zeros(len(vectors[0]), dtype=np.uint64)
    for v in vectors:
        total = (total + v.astype(np.uint64)) & np.uint64((1 << bits) - 1)
    return total


@pytest.mark.parametrize("weights", [[1] * 10, [1, 5, 20, 100, 3], [5000] * 20])
def test_weighted_mean_error_within_the_stated_bound(weights: list[int]) -> None:
    cfg = EncodingConfig()
    rng = CryptoRng.from_seed(1, purpose="tests.encoding")
    d = 20_000
    updates = [(rng.uniform(d) * 2 - 1) * 0.8 for _ in weights]
    encoded = [
        encode_update(u, weight=w, config=cfg, rng=rng)
        for u, w in zip(updates, weights, strict=True)
    ]
    mean, total_weight = decode_mean(_sum(encoded, cfg.bits), config=cfg)
    assert total_weight == sum(weights)  # the weights travel exactly
    exact = sum(w * u for u, w in zip(updates, weights, strict=True)) / sum(weights)
    err = mean - exact
    bound = cfg.error_bound(sites=len(weights), total_weight=total_weight)
    assert np.sqrt(np.mean(err**2)) <= bound  # RMS below the sd bound
    assert np.max(np.abs(err)) <= 8 * bound
    assert abs(np.mean(err)) <= 6 * bound / np.sqrt(d)  # unbiased


def test_through_secure_aggregation() -> None:
    cfg = EncodingConfig(bits=32)
    rng = CryptoRng.from_seed(2, purpose="tests.encoding")
    updates = {c: (rng.uniform(100) - 0.5) for c in range(5)}
    weights = {c: c + 1 for c in range(5)}
    encoded = {
        c: encode_update(updates[c], weight=weights[c], config=cfg, rng=rng) for c in range(5)
    }
    total, survivors = aggregate_in_memory(encoded, bits=32, seed=3, dropouts={"masked_input": {4}})
    mean, w = decode_mean(total, config=cfg)
    assert w == 1 + 2 + 3 + 4
    exact = sum(weights[c] * updates[c] for c in survivors) / w
    assert np.max(np.abs(mean - exact)) < 6 * cfg.error_bound(sites=4, total_weight=w)


def test_clipping_applies_per_coordinate() -> None:
    cfg = EncodingConfig(clip=0.5)
    enc = encode_update(
        np.array([3.0, -3.0, 0.25]), weight=2, config=cfg, rng=CryptoRng.from_seed(0)
    )
    mean, w = decode_mean(enc, config=cfg)
    np.testing.assert_allclose(mean, [0.5, -0.5, 0.25], atol=1e-6)
    assert w == 2


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    bits=st.integers(8, 62),
    values=st.lists(st.integers(-(2**61), 2**61), min_size=1, max_size=20),
)
def test_ring_round_trip(bits: int, values: list[int]) -> None:
    half = 1 << (bits - 1)
    v = np.array([((x + half) % (1 << bits)) - half for x in values], dtype=np.int64)
    ring = to_ring(v, bits=bits)
    assert ring.dtype == (np.uint32 if bits <= 32 else np.uint64)
    assert int(ring.max()) < (1 << bits)
    np.testing.assert_array_equal(from_ring(ring, bits=bits), v)


def test_stochastic_rounding_is_unbiased() -> None:
    rng = CryptoRng.from_seed(4)
    z = np.full(100_000, 0.3)
    r = stochastic_round(z, rng=rng)
    assert set(np.unique(r)) == {0, 1}
    # mean 0.3, sd of the mean sqrt(0.21/1e5) = 0.00145; 6 sd band
    assert abs(r.mean() - 0.3) < 0.0087
    np.testing.assert_array_equal(stochastic_round(np.array([2.0, -3.0]), rng=rng), [2, -3])


@pytest.mark.parametrize(
    "update",
    [
        np.array([np.nan, 0.0]),
        np.array([np.inf, 0.0]),
        np.array([-np.inf]),
        np.array([], dtype=np.float64),
        np.zeros((2, 2)),
        np.array([1, 2, 3]),  # integers: not a float update
    ],
)
def test_bad_updates_are_refused(update: np.ndarray) -> None:
    with pytest.raises(LocalProtocolError):
        encode_update(update, weight=1, config=EncodingConfig(), rng=CryptoRng.from_seed(0))


@pytest.mark.parametrize("weight", [-1, 1.5, True, (1 << 20) + 1])
def test_bad_weights_are_refused(weight: object) -> None:
    with pytest.raises(LocalProtocolError):
        encode_update(
            np.zeros(3), weight=weight, config=EncodingConfig(), rng=CryptoRng.from_seed(0)
        )  # type: ignore[arg-type]


def test_decode_refuses_sums_that_may_have_wrapped() -> None:
    cfg = EncodingConfig(max_total_weight=10)
    rng = CryptoRng.from_seed(5)
    parts = [encode_update(np.ones(4) * 0.9, weight=6, config=cfg, rng=rng) for _ in range(2)]
    with pytest.raises(LocalProtocolError):
        decode_mean(_sum(parts, cfg.bits), config=cfg)
    with pytest.raises(LocalProtocolError):
        decode_mean(to_ring(np.zeros(3, dtype=np.int64), bits=32), config=cfg)


def test_config_is_validated() -> None:
    for kwargs in ({"bits": 7}, {"clip": 0.0}, {"clip": float("nan")}, {"max_total_weight": 0}):
        with pytest.raises(ConfigError):
            EncodingConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(0,), (7,), (3, 5), ((1 << 16) + 3,)])
def test_stochastic_rounding_draws_exactly_the_documented_coins(shape: tuple[int, ...]) -> None:
    """floor(z) + [u < z - floor(z)] with u = (64-bit word >> 11) * 2**-53, the words drawn in order
    from the generator: the blocked implementation must give exactly this, block edges included."""
    z = np.random.default_rng(3).normal(size=shape) * np.float64(1e6)
    z.reshape(-1)[:3] = [0.5, -2.0, 2.0**61] if z.size >= 3 else z.reshape(-1)[:3]
    got = stochastic_round(z, rng=CryptoRng.from_seed(9))
    low = np.floor(z)
    coins = CryptoRng.from_seed(9).uniform(z.size).reshape(shape)
    assert got.dtype == np.int64 and got.shape == shape
    assert np.array_equal(got, low.astype(np.int64) + (coins < z - low))


def test_rounding_refuses_before_drawing() -> None:
    rng = CryptoRng.from_seed(4)
    with pytest.raises(LocalProtocolError, match="NaN or infinite"):
        stochastic_round(np.array([1.0] * (1 << 17) + [np.nan]), rng=rng)
    assert np.array_equal(rng.uint64(4), CryptoRng.from_seed(4).uint64(4))  # nothing was drawn
