"""Record-level DP-SGD at a site: budget enforcement, isolation, and where the noise comes from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import optimizer as opacus_optimizer
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from sklearn.datasets import load_digits
from torch import nn

from fedcore.crypto.stream import CryptoRng
from fedcore.errors import BudgetExceededError, ConfigError
from fedcore.models import build_model
from fedcore.privacy.dpsgd import (
    CryptoDPOptimizer,
    CryptoDPOptimizerGhost,
    GradSampleMode,
    SiteDPConfig,
    plan_round,
    train_dp_sgd,
)
from fedcore.privacy.events import PoissonSubsampledGaussian
from fedcore.privacy.ledger import Budget, PrivacyLedger, Scope, ScopeKind


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return (d.data[:120] / 16).astype(np.float32), d.target[:120].astype(np.int64)


def site_ledger(eps: float, path=None, accountant: str = "pld") -> PrivacyLedger:
    scope = Scope(ScopeKind.SITE_RECORDS, "site-1")
    budget = Budget(epsilon=eps, delta=1e-5)
    return PrivacyLedger(scope=scope, budget=budget, path=path, accountant=accountant)


def cheap_ledger() -> PrivacyLedger:
    """A roomy RDP ledger, for tests about training rather than accounting (RDP is fast)."""
    return site_ledger(1e6, accountant="rdp")


def model(name: str = "mlp") -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, input_shape=(64,), num_classes=10)


def rng(seed: int = 0) -> CryptoRng:
    return CryptoRng.from_seed(seed, purpose="dpsgd-test")


def test_a_small_budget_trains_the_planned_rounds_then_declines(digits, tmp_path):
    x, y = digits
    config = SiteDPConfig(epochs=1, batch_size=40, lr=0.5, max_grad_norm=1.0, planned_rounds=3)
    led = site_ledger(2.0, path=tmp_path / "site.json")
    led.save(tmp_path / "site.json")
    net, generator, trained = model(), rng(), 0
    for r in range(5):
        try:
            result = train_dp_sgd(
                net, x, y, config=config, ledger=led, rng=generator, round_number=r
            )
        except BudgetExceededError:
            break
        net.load_state_dict(result.state)
        trained += 1
        assert result.steps == 3 and result.sample_rate == pytest.approx(1 / 3)
        assert result.epsilon == led.epsilon() <= 2.0
    assert trained == 3  # calibrated for exactly 3 rounds, then the site declines
    assert len(PrivacyLedger.load(tmp_path / "site.json").entries) == 3
    # Declining happens before training: no parameter moved, nothing was charged.
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(BudgetExceededError):
        train_dp_sgd(net, x, y, config=config, ledger=led, rng=generator)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert len(led.entries) == 3


def test_plan_matches_the_issue(digits):
    config = SiteDPConfig(epochs=2, batch_size=32, lr=0.1, max_grad_norm=1.0, noise_multiplier=1.1)
    plan = plan_round(config, num_examples=180, ledger=site_ledger(8.0))
    assert plan.sample_rate == 32 / 180 and plan.steps == 2 * round(180 / 32)
    assert plan.event == PoissonSubsampledGaussian(
        sampling_rate=32 / 180, noise_multiplier=1.1, count=12
    )


@pytest.mark.parametrize("name", ["cnn"])
def test_noise_only_from_the_crypto_rng_and_model_untouched(digits, monkeypatch, name):
    x, y = digits

    def forbidden(*args, **kwargs):
        raise AssertionError("Opacus's own noise generator was called")

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", forbidden)
    config = SiteDPConfig(epochs=1, batch_size=30, lr=0.5, max_grad_norm=1.0, noise_multiplier=1.0)
    net = model(name)
    original = {k: v.clone() for k, v in net.state_dict().items()}
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    runs = [
        train_dp_sgd(net, x, y, config=config, ledger=cheap_ledger(), rng=rng(s)) for s in (7, 7, 8)
    ]
    assert torch.equal(torch.get_rng_state(), torch_state)  # no global torch draws at all
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)
    assert all(torch.equal(original[k], v) for k, v in net.state_dict().items())
    same = all(torch.equal(runs[0].state[k], runs[1].state[k]) for k in original)
    differ = any(not torch.equal(runs[0].state[k], runs[2].state[k]) for k in original)
    assert same and differ
    assert runs[0].grad_sample_mode is GradSampleMode.GHOST


def test_ghost_and_hooks_take_the_same_steps(digits):
    # Same sampling and noise stream: the two clipping implementations must agree.
    x, y = digits
    states = []
    for mode in (GradSampleMode.GHOST, GradSampleMode.HOOKS):
        config = SiteDPConfig(
            epochs=1,
            batch_size=30,
            lr=0.5,
            max_grad_norm=0.5,
            noise_multiplier=1.0,
            grad_sample_mode=mode,
            momentum=0.5,
        )
        result = train_dp_sgd(model("cnn"), x, y, config=config, ledger=cheap_ledger(), rng=rng(3))
        assert result.grad_sample_mode is mode
        states.append(result.state)
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-4, atol=1e-5)


class _ZeroLoss(nn.Module):
    reduction = "mean"

    def forward(self, out, target):
        per_sample = out.sum(dim=1) * 0.0
        return per_sample if self.reduction == "none" else per_sample.mean()


@pytest.mark.parametrize("ghost", [False, True])
def test_noise_std_is_sigma_c_over_batch(ghost):
    """With zero gradients, the step's gradient is pure noise: std sigma*C/B.

    250_500 parameters: the sample std's relative standard error is 1/sqrt(2n) = 0.14%; the
    tolerance is 1% (and float32 rounding is far below it).
    """
    sigma, clip, batch = 1.3, 0.7, 16.0
    torch.manual_seed(0)
    net = nn.Linear(500, 500)
    if ghost:
        gsm = GradSampleModuleFastGradientClipping(net, max_grad_norm=clip, loss_reduction="mean")
        cls = CryptoDPOptimizerGhost
    else:
        gsm = GradSampleModule(net, loss_reduction="mean")
        cls = CryptoDPOptimizer
    opt = cls(
        torch.optim.SGD(gsm.parameters(), lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=batch,
        rng=rng(11),
    )
    x, y = torch.randn(16, 500), torch.zeros(16, dtype=torch.long)
    loss_fn = DPLossFastGradientClipping(gsm, opt, _ZeroLoss(), "mean") if ghost else _ZeroLoss()
    loss_fn(gsm(x), y).backward()
    opt.pre_step()
    grads = torch.cat([p.grad.ravel() for p in gsm.parameters()]).double()
    target = sigma * clip / batch
    assert abs(grads.std().item() / target - 1) < 0.01
    assert abs(grads.mean().item()) < 5 * target / grads.numel() ** 0.5
    gsm._close()


def test_empty_poisson_batches_still_take_noisy_steps(digits):
    x, y = digits
    tiny_x, tiny_y = x[:3], y[:3]  # q = 1/3 of 3 records: many empty batches
    config = SiteDPConfig(
        epochs=4,
        batch_size=1,
        lr=0.1,
        max_grad_norm=1.0,
        noise_multiplier=2.0,
        grad_sample_mode=GradSampleMode.HOOKS,
    )
    net = model()
    result = train_dp_sgd(net, tiny_x, tiny_y, config=config, ledger=cheap_ledger(), rng=rng())
    assert result.steps == 12
    assert any(not torch.equal(net.state_dict()[k], v) for k, v in result.state.items())


def test_bad_inputs_are_config_errors(digits):
    x, y = digits
    with pytest.raises(ConfigError):
        SiteDPConfig(epochs=1, batch_size=10, lr=0.1, max_grad_norm=1.0)  # no noise, no plan
    config = SiteDPConfig(epochs=1, batch_size=10, lr=0.1, max_grad_norm=1.0, noise_multiplier=1.0)
    fed = PrivacyLedger(
        scope=Scope(ScopeKind.FEDERATION_SITES, "f"), budget=Budget(epsilon=1, delta=1e-5)
    )
    for args, ledger, generator in [
        ((x, y[:-1]), site_ledger(5.0), rng()),
        ((x, y), fed, rng()),
        ((x, y), site_ledger(5.0), np.random.default_rng(0)),
        ((x * np.nan, y), site_ledger(5.0), rng()),
    ]:
        with pytest.raises(ConfigError):
            train_dp_sgd(model(), *args, config=config, ledger=ledger, rng=generator)
