"""Record-level DP-SGD at one site, for one federated round, charged to the site's ledger.

Theory of operation. Abadi et al., "Deep Learning with Differential Privacy" (CCS 2016), Alg. 1:
each step draws a Poisson sample (every record independently with probability ``q``), clips each
record's gradient to L2 norm ``C``, sums, adds N(0, (z C)^2 I) and divides by the expected batch
size ``q n``. Each step is the Poisson-subsampled Gaussian with rate ``q`` and noise multiplier
``z`` for the unit "one record of this site" (add/remove adjacency), so a round of ``T`` steps is
``PoissonSubsampledGaussian(q, z, count=T)``, with ``q = batch_size / n`` and
``T = epochs * round(1 / q)``. The guarantee covers everything computed from the trained weights
(post-processing); it does *not* cover ``train_loss``, which is a non-private statistic of the
site's data and should stay at the site unless the site accepts that.

Implementation. Per-sample clipping is fedcore's fused clipper (:mod:`fedcore.privacy.fused_clip`:
ghost norms and clipped sums from one forward and one output-gradient pass) for models built
from Linear, Conv2d and GroupNorm layers, which is what ``grad_sample_mode = ghost`` (and ``auto``)
runs; for other models Opacus's (ghost clipping, Li et al. 2022 and Bu et al. 2023, where every
trainable layer has a registered sampler; otherwise per-sample gradient hooks). The fused clipper
is about twice as fast per step as Opacus's ghost clipping on the bundled models
(``benchmarks/dp_overhead.py``) and gives the same clipped sum (tested against Opacus).
What fedcore replaces, and why:

- *Sampling*: batches are Poisson draws from a :class:`~fedcore.crypto.stream.CryptoRng`, not
  from Opacus's ``DPDataLoader`` (which would use torch's global generator). Empty batches still
  take a noise-only step, as the analysis assumes.
- *Noise*: the DP optimiser's ``add_noise`` releases the summed clipped gradient with the discrete
  Gaussian on a fine grid (:mod:`fedcore.privacy.noise`; Canonne, Kamath and Steinke 2020) drawn
  from the ``CryptoRng``: the noised sum is computed exactly in float64 on a power-of-two grid, so
  its low-order bits do not leak the gradient (Mironov 2012; Jin et al. 2022); the cast to
  float32 is post-processing. Opacus's ``secure_mode`` would need torchcsprng, which is not
  installable here.
- *Accounting*: no ``PrivacyEngine`` and no Opacus accountant. The site's ledger is its only
  accountant, across rounds; a round's event is checked against it before training and
  committed to it before the trained weights are returned.
- *Isolation*: each round trains a deep copy of the caller's model (so hooks are never attached
  twice) with a fresh optimiser (so momentum never carries across rounds), built after
  ``ModuleValidator.fix``, which itself copies modules.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus.grad_sample import (
    GradSampleHooksFastGradientClipping,
    GradSampleModule,
    GradSampleModuleFastGradientClipping,
)
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError, UnsupportedModel
from fedcore.privacy.dpsgd_plan import (  # noqa: F401 - re-exported: the plan needs no Opacus
    GradSampleMode,
    SiteDPConfig,
    SiteRoundPlan,
    plan_round,
)
from fedcore.privacy.events import PoissonSubsampledGaussian
from fedcore.privacy.fused_clip import FusedClipper
from fedcore.privacy.ledger import PrivacyLedger, ScopeKind
from fedcore.privacy.noise import add_grid_gaussian


@dataclass(frozen=True, slots=True)
class SiteRound:
    """A trained round. ``state`` is the trained copy's ``state_dict`` (CPU tensors);
    ``epsilon`` is the site's spend after this round; ``train_loss`` is *not* private."""

    state: dict[str, torch.Tensor]
    train_loss: float
    steps: int
    sample_rate: float
    noise_multiplier: float
    grad_sample_mode: GradSampleMode
    event: PoissonSubsampledGaussian
    epsilon: float


def train_dp_sgd(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    config: SiteDPConfig,
    ledger: PrivacyLedger,
    rng: CryptoRng,
    round_number: int | None = None,
    device: torch.device | None = None,
) -> SiteRound:
    """Train a copy of ``model`` with DP-SGD for one round and charge ``ledger`` for it.

    ``x`` is float32 with one row per example, ``y`` int64 class labels. ``model`` is not
    modified. The copy and the data live on ``device`` (default: where ``model`` is); the noise
    is drawn on the CPU from ``rng`` and moved there. Raises :class:`BudgetExceededError` *before training* if the ledger cannot afford
    the round (ledger unchanged); a site catches it to decline. Raises :class:`ConfigError` for
    bad settings, data, or a model Opacus cannot make private.
    """
    if ledger.scope.kind is not ScopeKind.SITE_RECORDS:
        raise ConfigError(f"DP-SGD charges a site_records ledger, got {ledger.scope}")
    if not isinstance(rng, CryptoRng):
        raise ConfigError(f"DP-SGD noise and sampling need a CryptoRng, got {type(rng).__name__}")
    xs, ys = _check_data(x, y)
    plan = plan_round(config, num_examples=len(xs), ledger=ledger)
    ledger.check(plan.event)  # refuse before touching the data

    work = _private_copy(model)
    if device is not None:
        work.to(device)
    where = next((p.device for p in work.parameters()), torch.device("cpu"))
    xs, ys = xs.to(where), ys.to(where)
    mode = _resolve_mode(config.grad_sample_mode, work, probe=xs[:2])
    with warnings.catch_warnings():
        # Opacus warns on every step that PyTorch's full backward hooks ignore some inputs' grads;
        # its own per-sample gradients do not depend on those, and the warning buries real output.
        warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
        warnings.filterwarnings("ignore", message=".*retain_graph.*")
        loss = _train(work, xs, ys, config=config, plan=plan, mode=mode, rng=rng)
    state = {k: v.detach().cpu().clone() for k, v in work.state_dict().items()}

    entry = ledger.charge(plan.event, round_number=round_number, label="dp-sgd round")
    return SiteRound(
        state=state,
        train_loss=loss,
        steps=plan.steps,
        sample_rate=plan.sample_rate,
        noise_multiplier=plan.noise_multiplier,
        grad_sample_mode=mode,
        event=plan.event,
        epsilon=entry.epsilon_after,
    )


def _check_data(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise ConfigError(
            f"x and y must be numpy arrays, got {type(x).__name__}, {type(y).__name__}"
        )
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ConfigError(
            f"x (n, ...) and y (n,) must have the same n >= 1; got {x.shape}, {y.shape}"
        )
    if not np.all(np.isfinite(x)):
        raise ConfigError("x holds NaN or infinite values")
    if y.dtype.kind not in "iu" or y.min() < 0:
        raise ConfigError(f"y must hold non-negative integer labels, got dtype {y.dtype}")
    return (
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
    )


def _private_copy(model: nn.Module) -> nn.Module:
    work = ModuleValidator.fix(copy.deepcopy(model))
    errors = ModuleValidator.validate(work, strict=False)
    if errors:
        raise ConfigError(f"model cannot be trained with DP-SGD: {errors[0]}")
    return work


def _resolve_mode(
    mode: GradSampleMode, module: nn.Module, *, probe: torch.Tensor
) -> GradSampleMode:
    """The mode that will run. ``ghost`` and ``auto`` run the fused clipper if it supports the
    model, checked by structure and by one forward pass on ``probe`` (nothing is released)."""
    if mode in (GradSampleMode.GHOST, GradSampleMode.AUTO):
        support = _fused_support(module, probe)
        if support == "yes":
            return GradSampleMode.GHOST
        if mode is GradSampleMode.GHOST:
            return GradSampleMode.OPACUS_GHOST
        if support == "usage":  # a layer ran twice or in place: Opacus's ghost refuses it too
            return GradSampleMode.HOOKS
    if mode is not GradSampleMode.AUTO:
        return mode
    known = set(GradSampleHooksFastGradientClipping.GRAD_SAMPLERS) | set(
        GradSampleHooksFastGradientClipping.NORM_SAMPLERS
    )
    for sub in module.modules():
        owns = any(p.requires_grad for p in sub.parameters(recurse=False))
        if owns and type(sub) not in known:
            return GradSampleMode.HOOKS
    return GradSampleMode.OPACUS_GHOST


def _fused_support(module: nn.Module, probe: torch.Tensor) -> str:
    """``"yes"``, ``"structure"`` (a layer type the fused clipper lacks) or ``"usage"`` (the
    probe's forward pass ran a layer twice or changed one's input or output in place)."""
    try:
        clipper = FusedClipper(module, max_grad_norm=1.0)
    except UnsupportedModel:
        return "structure"
    try:
        with clipper.capture():
            out = module(probe)
        clipper.clipped_sum(out.float().sum())
    except UnsupportedModel:
        return "usage"
    finally:
        clipper.close()
    return "yes"


def release_noised_sum(
    sums: list[torch.Tensor], *, std: float, max_grad_norm: float, rng: CryptoRng
) -> list[torch.Tensor]:
    """The clipped gradient sums (one per parameter) released with the grid Gaussian, as float32
    tensors on each sum's device. One grid over all parameters: the L2 sensitivity of the sum is
    ``max_grad_norm``."""
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


def _train(
    work: nn.Module,
    xs: torch.Tensor,
    ys: torch.Tensor,
    *,
    config: SiteDPConfig,
    plan: SiteRoundPlan,
    mode: GradSampleMode,
    rng: CryptoRng,
) -> float:
    if mode is GradSampleMode.GHOST:
        return _train_fused(work, xs, ys, config=config, plan=plan, rng=rng)
    n = len(xs)
    expected_batch = plan.sample_rate * n
    criterion = nn.CrossEntropyLoss()
    gsm: GradSampleModule | GradSampleModuleFastGradientClipping
    optimizer: CryptoDPOptimizer | CryptoDPOptimizerGhost
    if mode is GradSampleMode.OPACUS_GHOST:
        gsm = GradSampleModuleFastGradientClipping(
            work,
            batch_first=True,
            loss_reduction="mean",
            max_grad_norm=config.max_grad_norm,
            use_ghost_clipping=True,
        )
    else:
        gsm = GradSampleModule(work, batch_first=True, loss_reduction="mean")
    base = torch.optim.SGD(gsm.parameters(), lr=config.lr, momentum=config.momentum)
    ghost = mode is GradSampleMode.OPACUS_GHOST
    opt_cls = CryptoDPOptimizerGhost if ghost else CryptoDPOptimizer
    optimizer = opt_cls(
        base,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        expected_batch_size=expected_batch,
        rng=rng,
    )
    dp_loss = DPLossFastGradientClipping(gsm, optimizer, criterion, "mean") if ghost else None
    gsm.train()
    losses: list[float] = []
    try:
        for _ in range(plan.steps):
            idx = np.flatnonzero(rng.uniform(n) < plan.sample_rate)
            if idx.size == 0:
                optimizer.noise_only_step()
                continue
            index = torch.from_numpy(idx).to(xs.device)
            xb, yb = xs[index], ys[index]
            out = gsm(xb)
            loss = dp_loss(out, yb) if dp_loss is not None else criterion(out, yb)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.item()))
    finally:
        gsm._close()
    return float(np.mean(losses)) if losses else math.nan


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


def _train_fused(
    work: nn.Module,
    xs: torch.Tensor,
    ys: torch.Tensor,
    *,
    config: SiteDPConfig,
    plan: SiteRoundPlan,
    rng: CryptoRng,
) -> float:
    """The DP-SGD loop with :class:`FusedDPStep`; its sampling and noise draws from ``rng`` are
    the Opacus loop's, in the same order."""
    n = len(xs)
    stepper = FusedDPStep(
        work,
        max_grad_norm=config.max_grad_norm,
        noise_multiplier=plan.noise_multiplier,
        lr=config.lr,
        momentum=config.momentum,
        expected_batch_size=plan.sample_rate * n,
        rng=rng,
    )
    work.train()
    losses: list[float] = []
    try:
        for _ in range(plan.steps):
            idx = np.flatnonzero(rng.uniform(n) < plan.sample_rate)
            if idx.size == 0:  # a noise-only step, as the analysis assumes
                stepper.step(None, None)
                continue
            index = torch.from_numpy(idx).to(xs.device)
            loss = stepper.step(xs[index], ys[index])
            if loss is not None:
                losses.append(loss)
    finally:
        stepper.close()
    return float(np.mean(losses)) if losses else math.nan
