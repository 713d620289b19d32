"""One DP-SGD step: the clipped per-example gradient sum released with grid-Gaussian noise.

Two implementations with one interface (``step(xb, yb)``, ``close()``), which
:func:`fedcore.privacy.dpsgd.train_round` drives (its module docstring has the theory):

- :class:`FusedDPStep`: fedcore's fused clipper (:mod:`fedcore.privacy.fused_clip`), one forward
  and one output-gradient pass, then the release and an SGD update in multi-tensor operations;
- :class:`OpacusDPStep`: Opacus's per-sample hooks or ghost clipping, with the Opacus optimisers
  whose ``add_noise`` is :class:`CryptoDPOptimizer`'s (the same release, from a
  :class:`~fedcore.crypto.stream.CryptoRng`, never torch's generator).

Both release through :func:`release_noised_sum`: one grid over all parameters, L2 sensitivity
``max_grad_norm`` (:mod:`fedcore.privacy.noise`).
"""

from __future__ import annotations

import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from fedcore.crypto.stream import CryptoRng
from fedcore.privacy.dpsgd_plan import GradSampleMode
from fedcore.privacy.fused_clip import FusedClipper
from fedcore.privacy.noise import add_grid_gaussian


def release_noised_sum(
    sums: list[torch.Tensor], *, std: float, max_grad_norm: float, rng: CryptoRng
) -> list[torch.Tensor]:
    """The clipped gradient sums (one per parameter) released with the grid Gaussian, as float32
    tensors on each sum's device. One grid over all parameters: the L2 sensitivity of the sum is
    ``max_grad_norm``. ``std = 0`` releases the sums themselves: no privacy at all, which no
    :class:`SiteDPConfig` allows (its noise multiplier is > 0); only the audit's positive control
    (:mod:`fedcore.audit.run`) steps without noise."""
    if std == 0:
        return [s.detach().clone() for s in sums]
    # torch's flatten/unflatten helpers (those of DistributedDataParallel's buckets): one C++
    # call each way instead of a reshape, a detach and a view per parameter.
    flat = _flatten_dense_tensors(sums).detach().to("cpu", torch.float64).numpy()
    noised, _ = add_grid_gaussian(flat, std=std, sensitivity=max_grad_norm, rng=rng)
    out = torch.from_numpy(noised).to(sums[0].device, sums[0].dtype)
    return list(_unflatten_dense_tensors(out, sums))


class _CryptoNoise:
    """Mixin for Opacus DP optimisers: Gaussian noise from a CryptoRng, never from torch."""

    _rng: CryptoRng
    params: list[nn.Parameter]
    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: float

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        rng: CryptoRng,
    ) -> None:
        super().__init__(  # type: ignore[call-arg]  # the Opacus optimiser after this mixin
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
        )
        self._rng = rng

    def add_noise(self) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)  # type: ignore[attr-defined]
        noised = release_noised_sum(
            [p.summed_grad for p in self.params],  # type: ignore[attr-defined]
            std=self.noise_multiplier * self.max_grad_norm,
            max_grad_norm=self.max_grad_norm,
            rng=self._rng,
        )
        for p, grad in zip(self.params, noised, strict=True):
            p.grad = grad.to(p.dtype)
            _mark_as_processed(p.summed_grad)  # type: ignore[attr-defined]

    def noise_only_step(self) -> None:
        """A step on an empty Poisson sample: zero gradient sum plus noise, as the analysis says."""
        for p in self.params:
            p.summed_grad = torch.zeros_like(p)  # type: ignore[attr-defined]
        self.add_noise()
        for p in self.params:  # scale_grad, without the hooks optimiser's grad_sample bookkeeping
            if p.grad is not None:
                p.grad.div_(self.expected_batch_size)
        self.original_optimizer.step()  # type: ignore[attr-defined]
        self.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
        for p in self.params:
            p.summed_grad = None  # type: ignore[attr-defined]


class CryptoDPOptimizer(_CryptoNoise, DPOptimizer):
    """Opacus's per-sample-clipping optimiser with CryptoRng noise."""


class CryptoDPOptimizerGhost(_CryptoNoise, DPOptimizerFastGradientClipping):
    """Opacus's ghost-clipping optimiser with CryptoRng noise."""


class OpacusDPStep:
    """One DP-SGD step with Opacus's per-example clipping (``hooks``: per-sample gradient hooks,
    ``opacus-ghost``: ghost clipping) and the grid-Gaussian release of :class:`_CryptoNoise`; the
    same ``step``/``close`` as :class:`FusedDPStep`, so one loop (:func:`train_round`) runs both."""

    def __init__(
        self,
        work: nn.Module,
        *,
        mode: GradSampleMode,
        max_grad_norm: float,
        noise_multiplier: float,
        lr: float,
        momentum: float,
        expected_batch_size: float,
        rng: CryptoRng,
    ) -> None:
        ghost = mode is GradSampleMode.OPACUS_GHOST
        self.gsm: GradSampleModule | GradSampleModuleFastGradientClipping
        if ghost:
            self.gsm = GradSampleModuleFastGradientClipping(
                work,
                batch_first=True,
                loss_reduction="mean",
                max_grad_norm=max_grad_norm,
                use_ghost_clipping=True,
            )
        else:
            self.gsm = GradSampleModule(work, batch_first=True, loss_reduction="mean")
        base = torch.optim.SGD(self.gsm.parameters(), lr=lr, momentum=momentum)
        opt_cls = CryptoDPOptimizerGhost if ghost else CryptoDPOptimizer
        self.optimizer: CryptoDPOptimizer | CryptoDPOptimizerGhost = opt_cls(
            base,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            rng=rng,
        )
        self.criterion = nn.CrossEntropyLoss()
        self.dp_loss = (
            DPLossFastGradientClipping(self.gsm, self.optimizer, self.criterion, "mean")
            if ghost
            else None
        )
        self.gsm.train()

    def step(self, xb: torch.Tensor | None, yb: torch.Tensor | None) -> float | None:
        """A step on the batch, or a noise-only step for ``None`` (an empty Poisson sample);
        returns the batch's mean loss (not private), or None."""
        if xb is None or yb is None or len(xb) == 0:
            self.optimizer.noise_only_step()
            return None
        out = self.gsm(xb)
        loss = self.dp_loss(out, yb) if self.dp_loss is not None else self.criterion(out, yb)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.item())

    def close(self) -> None:
        self.gsm._close()


class FusedDPStep:
    """One DP-SGD step with the fused clipper: a forward pass, one output-gradient pass, the
    clipped sum, the grid-Gaussian release from ``rng`` and an SGD step on ``sum / (q n)``."""

    def __init__(
        self,
        work: nn.Module,
        *,
        max_grad_norm: float,
        noise_multiplier: float,
        lr: float,
        momentum: float,
        expected_batch_size: float,
        rng: CryptoRng,
    ) -> None:
        self.clipper = FusedClipper(work, max_grad_norm=max_grad_norm)
        self.work = work
        self.params = self.clipper.params
        self.lr, self.momentum = lr, momentum
        self._velocity: list[torch.Tensor] | None = None
        self.max_grad_norm = max_grad_norm
        self.std = noise_multiplier * max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.rng = rng

    def step(self, xb: torch.Tensor | None, yb: torch.Tensor | None) -> float | None:
        """A step on the batch, or a noise-only step for ``None`` (an empty Poisson sample);
        returns the batch's mean loss (not private), or None."""
        loss_value = None
        if xb is None or yb is None or len(xb) == 0:
            sums = [torch.zeros_like(p) for p in self.params]
        else:
            with self.clipper.capture():
                out = self.work(xb)
            loss = nn.functional.cross_entropy(out, yb, reduction="sum")
            sums, _ = self.clipper.clipped_sum(loss)
            loss_value = float(loss.detach()) / len(xb)
        self.apply(self.release(sums))
        return loss_value

    def release(self, sums: list[torch.Tensor]) -> list[torch.Tensor]:
        """The clipped sums with the grid Gaussian (the one release of a step)."""
        return release_noised_sum(
            sums, std=self.std, max_grad_norm=self.max_grad_norm, rng=self.rng
        )

    @torch.no_grad()
    def apply(self, noised_sums: list[torch.Tensor]) -> None:
        """The SGD update on ``noised_sums / (q n)`` (consumed): ``torch.optim.SGD``'s rule
        (momentum buffer started at the first gradient, no dampening, no weight decay) in at most
        three multi-tensor operations, without the optimiser's per-step overhead. Without momentum
        it is one, ``p -= (lr / (q n)) * sum`` (the same step up to float32 rounding)."""
        if not self.momentum:
            torch._foreach_add_(self.params, noised_sums, alpha=-self.lr / self.expected_batch_size)
            return
        torch._foreach_div_(noised_sums, self.expected_batch_size)
        if self._velocity is None:
            self._velocity = [g.clone() for g in noised_sums]
        else:
            torch._foreach_mul_(self._velocity, self.momentum)
            torch._foreach_add_(self._velocity, noised_sums)
        torch._foreach_add_(self.params, self._velocity, alpha=-self.lr)

    def close(self) -> None:
        self.clipper.close()
