"""DP-FedAvg at the server and the transforms it is built from."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedcore.crypto.stream import CryptoRng
from fedcore.errors import BudgetExceededError, ConfigError, InvalidMessage
from fedcore.privacy.accountant import epsilon
from fedcore.privacy.dpfedavg import (
    Clipping,
    ServerDPConfig,
    SiteSampling,
    dp_fedavg_round,
    fixed_size_sample,
    poisson_sample,
)
from fedcore.privacy.events import (
    FixedSizeSubsampledGaussian,
    GaussianEvent,
    NoPrivacyLoss,
    PoissonSubsampledGaussian,
)
from fedcore.privacy.ledger import Budget, PrivacyLedger, Scope, ScopeKind
from fedcore.privacy.transforms import (
    add_gaussian_noise,
    clip_to_norm,
    combine_gaussians,
    global_norm,
    noisy_clipped_count,
)

SHAPES = [(50, 40), (40,)]


def fed_ledger(eps: float = 50.0) -> PrivacyLedger:
    return PrivacyLedger(
        scope=Scope(ScopeKind.FEDERATION_SITES, "fed"), budget=Budget(epsilon=eps, delta=1e-5)
    )


def rng(seed: int = 0) -> CryptoRng:
    return CryptoRng.from_seed(seed, purpose="test")


def updates(n: int, scale: float, seed: int = 1) -> list[list[np.ndarray]]:
    g = np.random.default_rng(seed)  # test data only, never noise
    return [[(scale * g.standard_normal(s)).astype(np.float32) for s in SHAPES] for _ in range(n)]


def test_clip_to_norm():
    big = [np.full((3,), 4.0), np.full((1,), 2.0)]
    out = clip_to_norm(big, clip_norm=1.0)
    assert out.event == NoPrivacyLoss()
    assert global_norm(out.value) == pytest.approx(1.0)
    np.testing.assert_allclose(out.value[0] / out.value[0][0], 1.0)  # direction kept
    small = [np.array([0.1, 0.2])]
    np.testing.assert_array_equal(clip_to_norm(small, clip_norm=1.0).value[0], small[0])


def test_gaussian_noise_has_the_target_std():
    # 200_000 draws: the sample std has relative standard error 1/sqrt(2n) = 0.16%; we allow 1%.
    zeros = [np.zeros((400, 250)), np.zeros((100_000,))]
    out = add_gaussian_noise(zeros, std=0.7, sensitivity=0.35, rng=rng())
    noise = np.concatenate([a.ravel() for a in out.value])
    assert abs(noise.std() / 0.7 - 1) < 0.01
    assert abs(noise.mean()) < 5 * 0.7 / math.sqrt(noise.size)
    assert out.event == GaussianEvent(noise_multiplier=2.0)


def test_no_transform_uses_a_global_or_default_generator():
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    a = add_gaussian_noise([np.zeros(10)], std=1.0, sensitivity=1.0, rng=rng(5)).value[0]
    b = add_gaussian_noise([np.zeros(10)], std=1.0, sensitivity=1.0, rng=rng(5)).value[0]
    c = add_gaussian_noise([np.zeros(10)], std=1.0, sensitivity=1.0, rng=rng(6)).value[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)
    with pytest.raises(TypeError):
        add_gaussian_noise([np.zeros(3)], std=1.0, sensitivity=1.0)  # type: ignore[call-arg]
    with pytest.raises(ConfigError):
        add_gaussian_noise([np.zeros(3)], std=1.0, sensitivity=1.0, rng=np.random.default_rng())


def test_round_releases_clipped_mean_plus_noise_of_std_z_c_over_m():
    config = ServerDPConfig(
        total_sites=100, sites_per_round=10, noise_multiplier=1.3, clip_norm=2.0
    )
    ups = updates(8, scale=1.0)  # norms ~45, all clipped to 2
    led = fed_ledger()
    result = dp_fedavg_round(
        ups, shapes=SHAPES, config=config, clip_norm=2.0, ledger=led, rng=rng()
    )
    clipped_mean = [
        sum(clip_to_norm(u, clip_norm=2.0).value[i] for u in ups) / 10 for i in range(len(SHAPES))
    ]
    noise = np.concatenate(
        [(r - c).ravel() for r, c in zip(result.aggregate, clipped_mean, strict=True)]
    )
    target = 1.3 * 2.0 / 10
    assert abs(noise.std() / target - 1) < 0.05  # 2040 coordinates: standard error ~1.6%
    assert result.event == PoissonSubsampledGaussian(sampling_rate=0.1, noise_multiplier=1.3)
    assert led.events == (result.event,)
    assert result.epsilon == led.epsilon() == epsilon(result.event, delta=1e-5)
    assert [a.dtype for a in result.aggregate] == [np.float32, np.float32]


def test_fixed_size_sampling_charges_the_unamplified_event():
    config = ServerDPConfig(
        total_sites=20,
        sites_per_round=5,
        noise_multiplier=2.0,
        clip_norm=1.0,
        sampling=SiteSampling.FIXED_SIZE,
    )
    assert config.round_event() == FixedSizeSubsampledGaussian(
        sample_size=5, population_size=20, noise_multiplier=2.0
    )
    led = fed_ledger()
    dp_fedavg_round(
        updates(5, 1.0), shapes=SHAPES, config=config, clip_norm=1.0, ledger=led, rng=rng()
    )
    poisson = PoissonSubsampledGaussian(sampling_rate=0.25, noise_multiplier=2.0)
    assert led.epsilon() > epsilon(poisson, delta=1e-5)


def test_federation_budget_stops_before_the_round_that_would_exceed_it():
    config = ServerDPConfig(total_sites=10, sites_per_round=5, noise_multiplier=3.0, clip_norm=1.0)
    led = fed_ledger(eps=1.0)
    rounds = 0
    while led.can_afford(config.round_event()):
        dp_fedavg_round(
            updates(5, 1.0, seed=rounds),
            shapes=SHAPES,
            config=config,
            clip_norm=1.0,
            ledger=led,
            rng=rng(rounds),
        )
        rounds += 1
    assert rounds >= 1 and led.epsilon() <= 1.0
    before = led.entries
    with pytest.raises(BudgetExceededError):
        dp_fedavg_round(
            updates(5, 1.0), shapes=SHAPES, config=config, clip_norm=1.0, ledger=led, rng=rng()
        )
    assert led.entries == before


def test_malformed_update_is_rejected_before_anything_is_charged():
    config = ServerDPConfig(total_sites=10, sites_per_round=5, noise_multiplier=1.0, clip_norm=1.0)
    led = fed_ledger()
    bad_nan = updates(3, 1.0)
    bad_nan[1][0][0, 0] = np.nan
    bad_shape = updates(3, 1.0)
    bad_shape[2][1] = np.zeros((41,), dtype=np.float32)
    for bad in (bad_nan, bad_shape, [[np.zeros((50, 40), np.float32)]]):
        with pytest.raises(InvalidMessage):
            dp_fedavg_round(bad, shapes=SHAPES, config=config, clip_norm=1.0, ledger=led, rng=rng())
    assert led.entries == ()


def test_adaptive_clipping_noise_split_and_quantile_tracking():
    config = ServerDPConfig(
        total_sites=400,
        sites_per_round=100,
        noise_multiplier=1.0,
        clip_norm=0.1,
        clipping=Clipping.ADAPTIVE,
    )
    sigma_b = config.count_std
    assert sigma_b == 5.0  # m / 20 (Andrew et al. 2021)
    z_delta = config.update_noise_multiplier
    assert z_delta == pytest.approx((1.0 - (2 * sigma_b) ** -2) ** -0.5)
    combined = combine_gaussians(
        [GaussianEvent(noise_multiplier=z_delta), GaussianEvent(noise_multiplier=2 * sigma_b)]
    )
    assert combined.noise_multiplier == pytest.approx(1.0)
    assert config.round_event() == PoissonSubsampledGaussian(
        sampling_rate=0.25, noise_multiplier=1.0
    )

    # Updates with norms spread over [1, 9]: the median is 5; C should move there from 0.1.
    # All 100 sites every round (q = 1, a plain Gaussian: cheap to account 30 times).
    tracking = ServerDPConfig(
        total_sites=100,
        sites_per_round=100,
        noise_multiplier=1.0,
        clip_norm=0.1,
        clipping=Clipping.ADAPTIVE,
        clip_learning_rate=0.5,
    )
    g = np.random.default_rng(3)
    shapes = [(4,)]
    led = fed_ledger(eps=1e6)
    clip = 0.1
    for r in range(30):
        norms = g.uniform(1, 9, size=100)
        ups = [[(n * np.ones(4) / 2).astype(np.float32)] for n in norms]
        result = dp_fedavg_round(
            ups, shapes=shapes, config=tracking, clip_norm=clip, ledger=led, rng=rng(r)
        )
        clip = result.next_clip_norm
    assert 3.5 < clip < 6.5
    assert len(led.entries) == 30


def test_noisy_count_event_and_config_errors():
    out = noisy_clipped_count([0.5, 2.0, 0.1], clip_norm=1.0, noise_std=1e-9, rng=rng())
    assert out.value == pytest.approx(0.5)  # (1 + 0 + 1) - 3/2
    assert out.event == GaussianEvent(noise_multiplier=2e-9)
    with pytest.raises(ConfigError):  # 2 sigma_b must exceed z
        ServerDPConfig(
            total_sites=10,
            sites_per_round=5,
            noise_multiplier=3.0,
            clip_norm=1.0,
            clipping=Clipping.ADAPTIVE,
            count_noise_std=1.0,
        )
    with pytest.raises(ConfigError):
        ServerDPConfig(total_sites=10, sites_per_round=11, noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(ConfigError):
        ServerDPConfig(
            total_sites=10,
            sites_per_round=2.5,
            noise_multiplier=1.0,
            clip_norm=1.0,
            sampling=SiteSampling.FIXED_SIZE,
        )


def test_site_sampling_helpers():
    sites = list(range(1000))
    chosen = poisson_sample(sites, rate=0.1, rng=rng())
    assert 60 < len(chosen) < 140
    fixed = fixed_size_sample(sites, size=37, rng=rng())
    assert len(fixed) == len(set(fixed)) == 37
    assert fixed != fixed_size_sample(sites, size=37, rng=rng(1))
