"""Secure aggregation with DP never wraps the ring (issue 11 point 4) and a poisoned sum is
discarded (issue 10 point 6, the DP half)."""

import numpy as np
import pytest

from fedcore.crypto import CryptoRng
from fedcore.errors import ConfigError, ImplausibleSumError
from fedcore.mechanisms.central_on_secagg import (
    SiteClipping,
    check_dp_ring,
    decode_clipped_sum,
    dp_encoding,
    encode_clipped_update,
    ring_clip_norm,
)
from fedcore.secagg import encode_update, to_ring


def _sum_ring(vectors, bits):
    total = np.zeros_like(vectors[0], dtype=np.uint64)
    for v in vectors:
        total += v.astype(np.uint64)
    return to_ring(total.view(np.int64), bits=bits)


@pytest.mark.parametrize("bits", [12, 16, 32])
@pytest.mark.parametrize("clip", [0.5, 5.0])  # 5 > the old clip range 4 that wrapped
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_saturating_sites_never_wrap(bits, clip, sign):
    """Every site at the clip norm on one coordinate, all of one sign: the worst case for the ring.
    The issue's attack (C = 5, range 4) decoded -8 for +8 in 117 of 400 trials; here none may."""
    sites, dim = 5, 4
    config = dp_encoding(bits=bits, clip_norm=clip, sites=sites)
    clipping = SiteClipping(clip_norm=clip, count_unclipped=False)
    target = ring_clip_norm(clip, dim=dim, config=config)
    for trial in range(80):
        update = np.zeros(dim)
        update[trial % dim] = sign * 1e6  # far beyond C: clipped to C_ring on one coordinate
        vectors = [
            encode_clipped_update(
                update, clipping=clipping, config=config, rng=CryptoRng.from_seed(trial * 10 + i)
            )
            for i in range(sites)
        ]
        summed = decode_clipped_sum(_sum_ring(vectors, bits), clipping=clipping, config=config)
        expected = sites * sign * target
        assert summed.total[trial % dim] == pytest.approx(expected, abs=sites / config.scale)
        assert np.sign(summed.total[trial % dim]) == sign


def test_the_coordinate_range_follows_the_clip_norm():
    config = dp_encoding(bits=32, clip_norm=5.0, sites=10)
    assert config.clip >= 5.0  # |x_i| <= ||x|| <= C: the range never cuts a clipped update
    ceiling = (1 << 31) - 1
    # s = (M - 2n) / (n C): n sites at C s + 1 each fit under M
    assert 10 * (5.0 * config.scale + 1) <= ceiling


def test_a_site_refuses_an_encoding_narrower_than_the_clip_norm():
    """A server that offers a coordinate range below C (the old secagg.clip_range) is refused."""
    from fedcore.secagg import EncodingConfig

    narrow = EncodingConfig(bits=32, clip=4.0, max_total_weight=3)
    with pytest.raises(ConfigError, match="below the clip norm"):
        encode_clipped_update(
            np.ones(4),
            clipping=SiteClipping(clip_norm=5.0, count_unclipped=False),
            config=narrow,
            rng=CryptoRng.from_seed(0),
        )


def test_a_ring_that_cannot_fit_is_refused_before_the_run():
    with pytest.raises(ConfigError, match="secagg.bits"):
        check_dp_ring(bits=12, sites=10, dim=100_000)
    with pytest.raises(ConfigError, match="secagg.bits"):
        check_dp_ring(bits=8, sites=100, dim=10)
    check_dp_ring(bits=32, sites=100, dim=1_000_000)  # fits


def test_an_unclipped_site_makes_the_round_implausible():
    """A site that skips clipping (it encodes 10 C straight) cannot hide under the mask: the
    decoded sum's norm passes contributors x C and the round is discarded."""
    bits, sites, dim, clip = 32, 3, 50, 1.0
    config = dp_encoding(bits=bits, clip_norm=clip, sites=sites)
    clipping = SiteClipping(clip_norm=clip, count_unclipped=False)
    rng = np.random.default_rng(3)
    honest = [
        encode_clipped_update(
            rng.normal(size=dim), clipping=clipping, config=config, rng=CryptoRng.from_seed(i)
        )
        for i in range(sites - 1)
    ]
    poisoned = np.full(dim, 10 * clip / np.sqrt(dim)) * 1.0  # norm 10 C, each coordinate < range
    poisoned = poisoned * min(1.0, config.clip / poisoned.max())
    bad = encode_update(poisoned * 3, weight=1, config=config, rng=CryptoRng.from_seed(9))
    assert np.linalg.norm(np.clip(poisoned * 3, -config.clip, config.clip)) > sites * clip
    with pytest.raises(ImplausibleSumError, match="norm"):
        decode_clipped_sum(_sum_ring([*honest, bad], bits), clipping=clipping, config=config)
    # the honest sites alone pass
    decode_clipped_sum(_sum_ring(honest, bits), clipping=clipping, config=config)


def test_a_poisoned_sum_discards_the_round_through_the_real_path(tmp_path, monkeypatch):
    """One site skips clipping inside the real secure-aggregation round: the server discards the
    round with its reason and releases nothing (the round is charged as every round is, issue 20);
    the run goes on."""
    from fedcore.federation.site import secagg as secagg_site
    from fedcore.privacy import PrivacyLedger
    from fedcore.runrecord import read_rows
    from tests.federation.test_secagg_rounds import _run

    honest_encode = secagg_site.encode_clipped_update
    calls = {"n": 0}

    def poisoning(update, *, clipping, config, rng):
        calls["n"] += 1
        if calls["n"] == 1:  # the first site of round 1 sends every coordinate at the range
            return encode_update(
                np.full(np.size(update), config.clip), weight=1, config=config, rng=rng
            )
        return honest_encode(update, clipping=clipping, config=config, rng=rng)

    monkeypatch.setattr(secagg_site, "encode_clipped_update", poisoning)
    overrides = [
        "sites=4",
        "local_epochs=1",
        "rounds=2",
        "secagg.timeout=5",
        "secagg.enabled=true",
        "dp.server.epsilon=30",
        "dp.server.noise_multiplier=1.0",
    ]
    _, _, rows, _ = _run(tmp_path, "run", overrides)
    out = tmp_path / "run"
    assert "decoded sum discarded" in rows[0]["failures"]["round"]
    # charged all the same: whether a round is released must not change the published epsilons
    assert 0 < rows[0]["server_epsilon"] < rows[1]["server_epsilon"]
    entries = PrivacyLedger.load(out / "federation.ledger.json").entries
    assert [e.round_number for e in entries] == [1, 2]
    assert "failures" not in read_rows(out)[0]  # the reason is for the operator
