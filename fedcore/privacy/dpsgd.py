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
The step itself (clip, sum, release, update) is :mod:`fedcore.privacy.dpsgd_step`; the loop
around it, :func:`train_round`, is the one DP-SGD loop: a site's round runs it on the site's
records and ``fedcore audit`` runs it on those records plus its canaries
(:mod:`fedcore.audit.canaries`), so the audit attacks the sampler, clipping and noise that train.
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
from typing import Protocol

import numpy as np
import torch
from opacus.grad_sample import GradSampleHooksFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn

from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError, UnsupportedModel
from fedcore.privacy.dpsgd_plan import (  # noqa: F401 - re-exported: the plan needs no Opacus
    GradSampleMode,
    SiteDPConfig,
    SiteRoundPlan,
    plan_round,
)
from fedcore.privacy.dpsgd_step import (  # noqa: F401 - re-exported: the steps this loop runs
    CryptoDPOptimizer,
    CryptoDPOptimizerGhost,
    FusedDPStep,
    OpacusDPStep,
    release_noised_sum,
)
from fedcore.privacy.events import PoissonSubsampledGaussian
from fedcore.privacy.fused_clip import FusedClipper
from fedcore.privacy.ledger import PrivacyLedger, ScopeKind


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
    loss = train_round(work, TensorRecords(xs, ys), config=config, plan=plan, mode=mode, rng=rng)
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


class DPStep(Protocol):
    """One DP-SGD step: clip each example's gradient, sum, release with noise, update."""

    def step(self, xb: torch.Tensor | None, yb: torch.Tensor | None) -> float | None: ...

    def close(self) -> None: ...


class Records(Protocol):
    """A site's training records as the DP-SGD loop reads them: a Poisson sample at a time."""

    def __len__(self) -> int: ...

    def batch(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs and labels of the records at ``index`` (sorted, non-empty)."""
        ...


@dataclass(frozen=True, slots=True)
class TensorRecords:
    """Records held as two tensors on one device (what :func:`train_dp_sgd` trains on)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        at = torch.from_numpy(index).to(self.x.device)
        return self.x[at], self.y[at]


def poisson_sample(n: int, sample_rate: float, rng: CryptoRng) -> np.ndarray:
    """The indices of one Poisson sample: each of ``n`` records independently with probability
    ``sample_rate``, from ``rng`` (never torch's or numpy's generator)."""
    return np.flatnonzero(rng.uniform(n) < sample_rate)


def dp_step(
    work: nn.Module,
    *,
    config: SiteDPConfig,
    plan: SiteRoundPlan,
    mode: GradSampleMode,
    expected_batch_size: float,
    rng: CryptoRng,
) -> DPStep:
    """The step ``mode`` runs (``ghost``: :class:`FusedDPStep`, else :class:`OpacusDPStep`),
    clipping to ``config.max_grad_norm`` and adding noise of std ``plan.noise_multiplier`` times
    that. It holds hooks on ``work`` until closed."""
    if mode is GradSampleMode.GHOST:
        return FusedDPStep(
            work,
            max_grad_norm=config.max_grad_norm,
            noise_multiplier=plan.noise_multiplier,
            lr=config.lr,
            momentum=config.momentum,
            expected_batch_size=expected_batch_size,
            rng=rng,
        )
    return OpacusDPStep(
        work,
        mode=mode,
        max_grad_norm=config.max_grad_norm,
        noise_multiplier=plan.noise_multiplier,
        lr=config.lr,
        momentum=config.momentum,
        expected_batch_size=expected_batch_size,
        rng=rng,
    )


def train_round(
    work: nn.Module,
    records: Records,
    *,
    config: SiteDPConfig,
    plan: SiteRoundPlan,
    mode: GradSampleMode,
    rng: CryptoRng,
) -> float:
    """One round of DP-SGD on ``work`` (trained in place, a private copy): ``plan.steps`` Poisson
    samples of ``records`` at rate ``plan.sample_rate``, each a :func:`dp_step` (an empty sample
    takes a noise-only step, as the analysis assumes). Returns the mean batch loss (not private).

    The one DP-SGD loop: :func:`train_dp_sgd` runs it for a site, and the audit
    (:mod:`fedcore.audit.canaries`) runs it on the site's records plus its canaries, so the
    sampler, the clipping and the noise it audits are these. Charges nothing: the caller's ledger
    does. The sampling and noise draws from ``rng`` alternate, a sample then its step's noise.
    """
    n = len(records)
    stepper = dp_step(
        work, config=config, plan=plan, mode=mode, expected_batch_size=plan.sample_rate * n, rng=rng
    )
    work.train()
    losses: list[float] = []
    try:
        with warnings.catch_warnings():
            # Opacus warns on every step that PyTorch's full backward hooks ignore some inputs'
            # grads; its per-sample gradients do not depend on those, and the warning buries
            # real output.
            warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
            warnings.filterwarnings("ignore", message=".*retain_graph.*")
            for _ in range(plan.steps):
                idx = poisson_sample(n, plan.sample_rate, rng)
                loss = stepper.step(*records.batch(idx)) if idx.size else stepper.step(None, None)
                if loss is not None:
                    losses.append(loss)
    finally:
        stepper.close()
    return float(np.mean(losses)) if losses else math.nan
