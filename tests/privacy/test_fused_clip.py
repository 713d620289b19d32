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
