"""The fused clipper's clipped gradient sum against Opacus's per-sample clipping, on one batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from sklearn.datasets import load_digits
from torch import nn

from fedcore.models import build_model
from fedcore.privacy.fused_clip import FusedClipper, UnsupportedModel, unsupported_reason


def opacus_clipped_sum(net: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float):
    """Opacus's own per-sample clipping (hooks, DPOptimizer.clip_and_accumulate), no noise."""
    gsm = GradSampleModule(net, loss_reduction="sum")
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=len(x),
        loss_reduction="sum",
    )
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    opt.clip_and_accumulate()
    sums = [p.summed_grad.detach().clone() for p in opt.params]
    gsm._close()
    return sums


def fused_clipped_sum(net: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float):
    clipper = FusedClipper(net, max_grad_norm=clip)
    with clipper.capture():
        out = net(x)
    sums, norms = clipper.clipped_sum(nn.functional.cross_entropy(out, y, reduction="sum"))
    clipper.close()
    assert all(p.grad is None for p in net.parameters())  # no parameter gradient was computed
    return sums, norms


class SeqNet(nn.Module):
    """Linear on (B, T, in) inputs (both branches), a strided bias-free conv, a frozen weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False)
        self.mix = nn.Linear(4, 80)  # out * in = 320 > T^2 = 256: the ghost-identity branch
        self.frozen = nn.Linear(80, 6)
        self.frozen.weight.requires_grad_(False)
        self.head = nn.Linear(6 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.view(-1, 1, 8, 8)).flatten(2).transpose(1, 2)  # (B, 16, 4)
        h = self.frozen(torch.tanh(self.mix(h)))
        return self.head(h.flatten(1))


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("name", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("clip", [0.05, 1.0, 1e3])  # every example clipped / some / none
def test_fused_clipped_sum_equals_opacus(name, clip):
    """Tolerance: float32 sums of 48 examples in a different order, rtol 1e-4, atol 1e-6."""
    d = load_digits()
    x = torch.from_numpy((d.data[:48] / 16).astype(np.float32))
    y = torch.from_numpy(d.target[:48].astype(np.int64))
    torch.manual_seed(1)
    net = SeqNet() if name == "seq" else build_model(name, input_shape=(64,), num_classes=10)
    net_copy = SeqNet() if name == "seq" else build_model(name, input_shape=(64,), num_classes=10)
    net_copy.load_state_dict(net.state_dict())
    if name == "seq":
        net_copy.frozen.weight.requires_grad_(False)
    expected = opacus_clipped_sum(net_copy, x, y, clip)
    got, norms = fused_clipped_sum(net, x, y, clip)
    assert len(got) == len(expected) == sum(p.requires_grad for p in net.parameters())
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # The case is what it says: with clip 0.05 every example is clipped, with 1e3 none is.
    if clip == 0.05:
        assert bool((norms > clip).all())
    if clip == 1e3:
        assert bool((norms < clip).all())


def test_unsupported_layers_and_usages_are_refused():
    assert unsupported_reason(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))) is not None
    assert unsupported_reason(nn.Conv2d(4, 4, 3, groups=2)) is not None
    assert unsupported_reason(nn.Conv2d(4, 4, 3, padding="same")) is not None
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    assert unsupported_reason(tied) is not None

    twice = nn.Linear(3, 3)
    clipper = FusedClipper(twice, max_grad_norm=1.0)
    with clipper.capture():
        out = twice(twice(torch.randn(2, 3)))
    with pytest.raises(UnsupportedModel, match="more than once"):
        clipper.clipped_sum(out.sum())

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu_(self.fc(x))

    net = InPlace()
    clipper = FusedClipper(net, max_grad_norm=1.0)
    with clipper.capture():
        out = net(torch.randn(2, 3))
    with pytest.raises(UnsupportedModel, match="in place"):
        clipper.clipped_sum(out.sum())


# --- the fused path inside train_dp_sgd ---------------------------------------------------------


def _ledger():
    from fedcore.privacy.ledger import Budget, PrivacyLedger, Scope, ScopeKind

    return PrivacyLedger(
        scope=Scope(ScopeKind.SITE_RECORDS, "site-1"),
        budget=Budget(epsilon=1e6, delta=1e-5),
        accountant="rdp",
    )


def _digits(n: int = 60):
    d = load_digits()
    return (d.data[:n] / 16).astype(np.float32), d.target[:n].astype(np.int64)


def test_fused_noise_only_step_has_std_sigma_c_over_batch():
    """An empty Poisson sample: the update is pure noise, -lr * N_Z-grid(0, (z C)^2) / (q n).

    250_500 parameters: the sample std's relative standard error is 0.14%; tolerance 1%."""
    from fedcore.crypto.stream import CryptoRng
    from fedcore.privacy.dpsgd import FusedDPStep

    sigma, clip, batch = 1.3, 0.7, 16.0
    torch.manual_seed(0)
    net = nn.Linear(500, 500)
    before = torch.cat([p.detach().ravel().clone() for p in net.parameters()])
    step = FusedDPStep(
        net,
        max_grad_norm=clip,
        noise_multiplier=sigma,
        lr=1.0,
        momentum=0.0,
        expected_batch_size=batch,
        rng=CryptoRng.from_seed(11, purpose="fused-noise"),
    )
    assert step.step(None, None) is None
    step.close()
    moved = (before - torch.cat([p.detach().ravel() for p in net.parameters()])).double()
    target = sigma * clip / batch
    assert abs(moved.std().item() / target - 1) < 0.01
    assert abs(moved.mean().item()) < 5 * target / moved.numel() ** 0.5


def test_fused_round_with_empty_batches_and_a_device():
    """q = 1/3 of 3 records: many empty samples, each still a noisy step; the round runs on the
    device it is given and returns CPU tensors."""
    from fedcore.crypto.stream import CryptoRng
    from fedcore.privacy.dpsgd import GradSampleMode, SiteDPConfig, train_dp_sgd

    x, y = _digits(3)
    config = SiteDPConfig(epochs=4, batch_size=1, lr=0.1, max_grad_norm=1.0, noise_multiplier=2.0)
    torch.manual_seed(0)
    net = build_model("mlp", input_shape=(64,), num_classes=10)
    gen = CryptoRng.from_seed(5, purpose="fused-empty")
    result = train_dp_sgd(
        net, x, y, config=config, ledger=_ledger(), rng=gen, device=torch.device("cpu")
    )
    assert result.grad_sample_mode is GradSampleMode.GHOST and result.steps == 12
    assert all(v.device.type == "cpu" for v in result.state.values())
    assert any(not torch.equal(net.state_dict()[k], v) for k, v in result.state.items())


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mid(torch.tanh(self.mid(self.inp(x)))))


def test_a_layer_used_twice_falls_back_to_opacus():
    """The fused clipper would clip a reused layer wrongly; the probe sees it and Opacus's hooks
    run (Opacus's ghost clipping refuses parameter tying too)."""
    from fedcore.crypto.stream import CryptoRng
    from fedcore.privacy.dpsgd import GradSampleMode, SiteDPConfig, train_dp_sgd

    x, y = _digits()
    config = SiteDPConfig(epochs=1, batch_size=20, lr=0.1, max_grad_norm=1.0, noise_multiplier=1.0)
    result = train_dp_sgd(
        Twice(), x, y, config=config, ledger=_ledger(), rng=CryptoRng.from_seed(1)
    )
    assert result.grad_sample_mode is GradSampleMode.HOOKS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_fused_round_on_cuda(name):
    from fedcore.crypto.stream import CryptoRng
    from fedcore.privacy.dpsgd import GradSampleMode, SiteDPConfig, train_dp_sgd

    x, y = _digits()
    config = SiteDPConfig(epochs=1, batch_size=20, lr=0.1, max_grad_norm=1.0, noise_multiplier=1.0)
    torch.manual_seed(0)
    net = build_model(name, input_shape=(64,), num_classes=10)
    result = train_dp_sgd(
        net,
        x,
        y,
        config=config,
        ledger=_ledger(),
        rng=CryptoRng.from_seed(2),
        device=torch.device("cuda"),
    )
    assert result.grad_sample_mode is GradSampleMode.GHOST
    assert all(v.device.type == "cpu" and torch.isfinite(v).all() for v in result.state.values())
    # The clipped sums on the GPU equal Opacus's on the CPU.
    dx, dy = torch.from_numpy(x[:32]), torch.from_numpy(y[:32])
    torch.manual_seed(1)
    a = build_model(name, input_shape=(64,), num_classes=10)
    b = build_model(name, input_shape=(64,), num_classes=10)
    b.load_state_dict(a.state_dict())
    expected = opacus_clipped_sum(a, dx, dy, 1.0)
    got, _ = fused_clipped_sum(b.cuda(), dx.cuda(), dy.cuda(), 1.0)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-3, atol=1e-5)
