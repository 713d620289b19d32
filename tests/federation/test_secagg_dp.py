"""Site-level DP (DP-FedAvg) on top of secure aggregation: the site clips before masking, the
server noises the unmasked sum, and the release is the one plain DP-FedAvg makes from the same
noise draws, up to the encoding error."""

import json
import math

import numpy as np
import pytest

from fedcore.config import resolve
from fedcore.crypto import CryptoRng
from fedcore.errors import ConfigError, ImplausibleSumError
from fedcore.federation.server import dp_round as dp_server
from fedcore.federation.site import secagg as secagg_site
from fedcore.mechanisms.central_on_secagg import (
    SiteClipping,
    decode_clipped_sum,
    dp_encoding,
    encode_clipped_update,
    ring_clip_norm,
    session_length,
)
from fedcore.privacy import PrivacyLedger
from fedcore.privacy.events import event_to_json
from fedcore.protections import protections_of
from fedcore.secagg import to_ring
from tests.federation.conftest import honest
from tests.federation.test_secagg_rounds import _run as run_federation
from tests.federation.test_secagg_rounds import failing_at


def _sum_ring(vectors, bits):
    total = np.zeros_like(vectors[0], dtype=np.uint64)
    for v in vectors:
        total += v.astype(np.uint64)
    return to_ring(total.view(np.int64), bits=bits)


@pytest.mark.parametrize("bits", [16, 32])
@pytest.mark.parametrize("scale", [1e-3, 0.3, 50.0])
def test_an_encoded_contribution_stays_within_the_clip_norm(bits, scale):
    rng = np.random.default_rng(int(scale * 1000) + bits)
    dim, sites, clip = 2000, 3, 1.0
    config = dp_encoding(bits=bits, clip_norm=clip, sites=sites)
    clipping = SiteClipping(clip_norm=clip, count_unclipped=True)
    updates = [rng.normal(size=dim) * scale / np.sqrt(dim) for _ in range(sites)]
    vectors = [
        encode_clipped_update(u, clipping=clipping, config=config, rng=CryptoRng.from_seed(i))
        for i, u in enumerate(updates)
    ]
    assert all(v.shape == (session_length(dim, clipping),) for v in vectors)
    for v in vectors:  # each decoded contribution alone: norm below C, whatever the rounding did
        one = decode_clipped_sum(v, clipping=clipping, config=config)
        assert one.contributors == 1 and one.unclipped == int(scale <= clip)
        assert np.linalg.norm(one.total) <= clip
    summed = decode_clipped_sum(_sum_ring(vectors, bits), clipping=clipping, config=config)
    assert summed.contributors == sites and summed.unclipped == (sites if scale <= clip else 0)
    target = ring_clip_norm(clip, dim=dim, config=config)
    expected = sum(u * min(1.0, target / np.linalg.norm(u)) for u in updates)
    # Stochastic rounding moves each coordinate of each site by less than 1/s.
    assert np.max(np.abs(summed.total - expected)) < sites / config.scale


def test_a_ring_too_coarse_for_the_clip_norm_is_refused():
    config = dp_encoding(bits=8, clip_norm=1.0, sites=10)
    with pytest.raises(ConfigError, match="raise 'secagg.bits'"):
        ring_clip_norm(1.0, dim=10_000, config=config)


def test_an_out_of_range_unclipped_count_is_refused():
    config = dp_encoding(bits=32, clip_norm=1.0, sites=3)
    clipping = SiteClipping(clip_norm=1.0, count_unclipped=True)
    vector = encode_clipped_update(
        np.zeros(5), clipping=clipping, config=config, rng=CryptoRng.from_seed(0)
    )
    vector[-1] = 2  # one contributor cannot count two unclipped sites
    with pytest.raises(ImplausibleSumError, match="unclipped count is 2"):
        decode_clipped_sum(vector, clipping=clipping, config=config)


def _run(tmp_path, monkeypatch, name, overrides, behaviours=None):
    """The federation run of test_secagg_rounds with the DP round's generator seeded, so two runs
    draw the same noise."""
    monkeypatch.setattr(dp_server, "CryptoRng", lambda: CryptoRng.from_seed(5, purpose="test"))
    _, grid, rows, model = run_federation(tmp_path, name, overrides, behaviours)
    return tmp_path / name, grid, rows, model


DP = [
    "sites=4",
    "local_epochs=1",
    "secagg.timeout=5",
    "dp.server.epsilon=10",
    "dp.server.noise_multiplier=1.0",
    "dp.server.clip_norm=0.5",
]


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_same_release_as_dp_fedavg_from_the_same_noise(tmp_path, monkeypatch, clipping):
    overrides = [*DP, "rounds=2", f"dp.server.clipping={clipping}"]
    _, _, plain_rows, plain = _run(tmp_path, monkeypatch, "plain", overrides)
    out, grid, rows, masked = _run(
        tmp_path, monkeypatch, "secagg", [*overrides, "secagg.enabled=true"]
    )
    assert [r["sites_replied"] for r in rows] == [4, 4]
    assert [r["server_epsilon"] for r in rows] == [r["server_epsilon"] for r in plain_rows]
    # Adaptive clipping: the count is exact under masking and the noise draw is the same, so the
    # next clip norm is identical; fixed: it stays at C.
    assert [r["clip_norm"] for r in rows] == pytest.approx([r["clip_norm"] for r in plain_rows])
    if clipping == "fixed":
        assert {r["clip_norm"] for r in rows} == {0.5}
    # The noise (std z C = 0.5 per coordinate, divided by m = 4) is the same draw in both runs; what
    # differs is the rounding (< m / s per coordinate, s ~ 1.3e8) and the sites' clip margin
    # sqrt(d)/s, then amplified by the second round's training.
    diff = max(float((masked[k] - plain[k]).abs().max()) for k in plain)
    assert 0 < diff < 1e-4, diff
    assert max(float(plain[k].abs().max()) for k in plain) > 0.05  # the noise is really there
    ledger = PrivacyLedger.load(out / "federation.ledger.json")
    assert ledger.epsilon() == pytest.approx(rows[-1]["server_epsilon"])
    for context in grid.contexts.values():  # the sites kept no secret in Flower's state
        assert set(context.state.config_records[secagg_site.SECAGG].keys()) <= {
            "round-id",
            "payloads",
            "unmasked",
            "session-id",
        }


def test_budget_stops_the_run_and_dropouts_do_not_change_the_charge(tmp_path, monkeypatch):
    # q = 1, z = 2: 1.99 after one round, 2.94 after two (Gaussian composition); 3.2 affords two.
    overrides = [
        "sites=5",
        "local_epochs=1",
        "rounds=5",
        "secagg.timeout=5",
        "secagg.enabled=true",
        "dp.server.epsilon=3.2",
        "dp.server.noise_multiplier=2.0",
    ]
    behaviours = {101: honest, 102: failing_at("advertise"), 103: honest, 104: honest, 105: honest}
    out, _, rows, _ = _run(tmp_path, monkeypatch, "run", overrides, behaviours)
    assert len(rows) == 2
    assert [r["server_epsilon"] for r in rows] == pytest.approx([1.9931, 2.9432], abs=2e-3)
    assert [set(r["secagg"]["survivors"]) for r in rows] == [{101, 103, 104, 105}] * 2
    assert all("102" in r["failures"] for r in rows)
    assert "round 3 not run" in (out / "summary.md").read_text()
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["server_budget"]["epsilon"] == 3.2 and len(privacy["federation"]["entries"]) == 2


def test_too_few_poisson_sampled_sites_skip_the_round_and_it_is_charged(tmp_path, monkeypatch):
    """Issue 20, point 1: a round skipped for too few Poisson-sampled sites used to be published
    uncharged (server_epsilon NaN), which told who was sampled. Now every round is charged, and
    the skip's own reveal probability is in the round's event."""
    overrides = [
        *DP,
        "rounds=2",
        "secagg.enabled=true",
        "fraction_train=0.01",
        "dp.server.delta=0.01",
    ]
    out, _, rows, _ = _run(tmp_path, monkeypatch, "run", overrides)
    assert len(rows) == 2
    entries = PrivacyLedger.load(out / "federation.ledger.json").entries
    assert len(entries) == 2, "stopped by charging every round, released or not"
    assert all(math.isfinite(r["server_epsilon"]) for r in rows)
    assert "revealed_with_probability" in json.dumps([event_to_json(e.event) for e in entries])


def test_a_federation_whose_skips_would_reveal_too_much_is_refused_before_it_starts():
    """At 10 sites sampled at rate 0.5, whether a round is skipped reveals a site's presence with
    probability 0.16 over 20 rounds, far above delta: refused before anything starts."""
    settings = resolve(
        overrides=["secagg.enabled=true", "dp.server.epsilon=4", "fraction_train=0.5"]
    )
    with pytest.raises(ConfigError, match="raise 'sites' or 'fraction_train'"):
        protections_of(settings).mechanism.server_config()
