"""Record-level DP-SGD with white-box gradient canaries, for a one-run audit.

Theory of operation. The audit of Steinke, Nasr and Jagielski (NeurIPS 2023, section 6, the
white-box setting with Dirac canaries): each of ``m`` canaries is a "record" whose clipped
gradient is ``C`` times a unit vector on one coordinate of its own (a Dirac canary), included in
the site's data with probability 1/2. DP-SGD treats an included canary like any record: in each
step it is Poisson-sampled with the same rate ``q`` and, when sampled, its gradient joins the
clipped sum before the noise. After training, the auditor (who sees the final model) scores each
canary by how far its coordinate moved against its gradient, and guesses which were included.

The canaries' coordinates live in a block of parameters that the data's loss never reaches (a
``Linear(1, m)`` fed zeros, whose output adds exactly 0 to the logits), so real gradients do not
blur the scores: what the auditor sees on those coordinates is the DP-SGD mechanism itself, the
sampling, the clip bound ``C``, fedcore's noise and its scale. That makes the audit as strong as
this kind of audit can be, which the positive control (the same run with the noise off) needs.

What is audited is fedcore's own DP-SGD: Poisson sampling from a :class:`CryptoRng`, the noise of
:class:`~fedcore.privacy.dpsgd.CryptoDPOptimizer` (this module only adds the canaries to the
clipped sum before that optimiser adds its noise), the noise multiplier that
:func:`~fedcore.privacy.dpsgd.plan_round` calibrates, and the epsilon the site's ledger charges for
the rounds. The step is the one a site would take for this model: the mode
``fedcore.privacy.dpsgd._resolve_mode`` picks for the configured ``grad_sample_mode`` (fedcore's
fused clipper, :class:`~fedcore.privacy.dpsgd.FusedDPStep`, for the bundled models; Opacus's
per-sample hooks with :class:`~fedcore.privacy.dpsgd.CryptoDPOptimizer` otherwise), so the audit
attacks the code that trains, and ``audit.json`` names it. The loop is fedcore's, run for all
rounds of one site in a row: without momentum, ``rounds`` rounds of ``T`` steps from the model
each round returns are the same as ``rounds * T`` steps.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError
from fedcore.privacy.dpsgd import (
    CryptoDPOptimizer,
    FusedDPStep,
    GradSampleMode,
    SiteDPConfig,
    SiteRoundPlan,
    _resolve_mode,
    plan_round,
)
from fedcore.privacy.ledger import Budget, PrivacyLedger, Scope, ScopeKind


class WithCanaries(nn.Module):
    """``model`` plus ``m`` canary coordinates (``canaries.weight[i, 0]``) that the loss never reaches."""

    def __init__(self, model: nn.Module, m: int) -> None:
        super().__init__()
        self.model = model
        self.canaries = nn.Linear(1, m, bias=False)
        nn.init.zeros_(self.canaries.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        zero = logits.new_zeros(x.shape[0], 1)
        return logits + self.canaries(zero).sum(dim=1, keepdim=True)  # adds exactly 0


class CanaryDPOptimizer(CryptoDPOptimizer):
    """fedcore's DP-SGD optimiser, with the sampled canaries' gradients in the clipped sum."""

    def __init__(self, *args, canary_weight: torch.Tensor, clip: float, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self._canary_weight = canary_weight
        self._clip = clip
        self.sampled = np.zeros(0, dtype=np.int64)  # canaries in this step's Poisson sample

    def add_noise(self) -> None:
        if self.sampled.size:
            summed = self._canary_weight.summed_grad.view(-1)  # type: ignore[attr-defined]
            summed[torch.from_numpy(self.sampled)] += (
                self._clip
            )  # Dirac canary: C on its coordinate
        if self.noise_multiplier == 0:  # the positive control: the clipped sum, no noise at all
            for p in self.params:
                _check_processed_flag(p.summed_grad)  # type: ignore[attr-defined]
                p.grad = p.summed_grad.view_as(p).clone()  # type: ignore[attr-defined]
                _mark_as_processed(p.summed_grad)  # type: ignore[attr-defined]
            return
        super().add_noise()


class CanaryFusedStep(FusedDPStep):
    """fedcore's fused DP-SGD step, with the sampled canaries' gradients in the clipped sum."""

    def __init__(self, work: WithCanaries, *, noise: bool, **kwargs) -> None:  # noqa: ANN003
        super().__init__(work, **kwargs)
        self._canary = next(i for i, p in enumerate(self.params) if p is work.canaries.weight)
        self._noise = noise
        self.sampled = np.zeros(0, dtype=np.int64)  # canaries in this step's Poisson sample

    def release(self, sums: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.sampled.size:
            sums[self._canary].view(-1)[torch.from_numpy(self.sampled)] += self.max_grad_norm
        if not self._noise:  # the positive control: the clipped sum, no noise at all
            return [s.detach().clone() for s in sums]
        return super().release(sums)


@dataclass(frozen=True, slots=True)
class CanaryRun:
    """The result of one training run with canaries."""

    scores: np.ndarray  # per canary: movement against its gradient, in units of one sampled step
    included: np.ndarray  # bool per canary: the secret the auditor guesses
    epsilon_formal: float  # what the site's ledger charged for all rounds
    noise_multiplier: float  # as planned
    noise_used: float  # what the run added: noise_multiplier, or 0 with the noise off
    sample_rate: float
    steps: int
    train_examples: int
    grad_sample_mode: str  # the step that ran: what a site would run for this model


def train_with_canaries(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    config: SiteDPConfig,
    rounds: int,
    epsilon: float,
    delta: float,
    accountant: str,
    canaries: int,
    noise: bool,
    rng: CryptoRng,
) -> CanaryRun:
    """Train ``rounds`` rounds of DP-SGD on ``(x, y)`` with ``canaries`` Dirac canaries.

    The noise multiplier is the one fedcore's site would use (``config``, calibrated to
    ``epsilon`` over ``rounds`` if it has none); ``noise=False`` trains with the noise off (the
    positive control), everything else equal. Raises :class:`ConfigError` for bad input.
    """
    if canaries < 2:
        raise ConfigError(f"an audit needs at least 2 canaries, got {canaries}")
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    from fedcore.privacy.dpsgd import _check_data, _private_copy

    xs, ys = _check_data(x, y)
    ledger = PrivacyLedger(
        scope=Scope(ScopeKind.SITE_RECORDS, "audit"),
        budget=Budget(epsilon=epsilon, delta=delta),
        accountant=accountant,
    )
    plan = plan_round(config, num_examples=len(xs), ledger=ledger)
    for r in range(rounds):  # the formal claim: what a site's ledger charges for these rounds
        ledger.charge(plan.event, round_number=r + 1, label="audited dp-sgd round")

    included = rng.uniform(canaries) < 0.5
    work = WithCanaries(_private_copy(model), canaries)
    n = len(xs)
    expected_batch = plan.sample_rate * n
    steps = plan.steps * rounds
    mode = _resolve_mode(config.grad_sample_mode, work, probe=xs[:2])
    if mode is GradSampleMode.GHOST:
        _run_fused(
            work,
            xs,
            ys,
            config=config,
            plan=plan,
            steps=steps,
            included=included,
            noise=noise,
            rng=rng,
        )
    else:
        _run_hooks(
            work,
            xs,
            ys,
            config=config,
            plan=plan,
            steps=steps,
            included=included,
            noise=noise,
            rng=rng,
        )
    moved = -work.canaries.weight.detach().double().view(-1).numpy()
    unit = config.lr * config.max_grad_norm / expected_batch  # one sampled step of one canary
    return CanaryRun(
        scores=moved / unit,
        included=included,
        epsilon_formal=ledger.epsilon(),
        noise_multiplier=plan.noise_multiplier,
        noise_used=plan.noise_multiplier if noise else 0.0,
        sample_rate=plan.sample_rate,
        steps=steps,
        train_examples=n,
        grad_sample_mode=mode.value if mode is GradSampleMode.GHOST else GradSampleMode.HOOKS.value,
    )


def _canaries_sampled(included: np.ndarray, sample_rate: float, rng: CryptoRng) -> np.ndarray:
    return np.flatnonzero(included & (rng.uniform(len(included)) < sample_rate))


def _run_fused(
    work: WithCanaries,
    xs: torch.Tensor,
    ys: torch.Tensor,
    *,
    config: SiteDPConfig,
    plan: SiteRoundPlan,
    steps: int,
    included: np.ndarray,
    noise: bool,
    rng: CryptoRng,
) -> None:
    """``fedcore.privacy.dpsgd._train_fused``'s loop, with the canaries drawn after each batch."""
    n = len(xs)
    stepper = CanaryFusedStep(
        work,
        noise=noise,
        max_grad_norm=config.max_grad_norm,
        noise_multiplier=plan.noise_multiplier,
        lr=config.lr,
        momentum=0.0,  # as the hooks loop: the scores assume plain SGD steps
        expected_batch_size=plan.sample_rate * n,
        rng=rng,
    )
    work.train()
    try:
        for _ in range(steps):
            idx = np.flatnonzero(rng.uniform(n) < plan.sample_rate)
            stepper.sampled = _canaries_sampled(included, plan.sample_rate, rng)
            if idx.size == 0:
                stepper.step(None, None)
                continue
            index = torch.from_numpy(idx)
            stepper.step(xs[index], ys[index])
    finally:
        stepper.close()


def _run_hooks(
    work: WithCanaries,
    xs: torch.Tensor,
    ys: torch.Tensor,
    *,
    config: SiteDPConfig,
    plan: SiteRoundPlan,
    steps: int,
    included: np.ndarray,
    noise: bool,
    rng: CryptoRng,
) -> None:
    """``fedcore.privacy.dpsgd._train``'s per-sample-hooks loop, canaries drawn after each batch."""
    gsm = GradSampleModule(work, batch_first=True, loss_reduction="mean")
    n = len(xs)
    optimizer = CanaryDPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=config.lr),
        noise_multiplier=plan.noise_multiplier if noise else 0.0,
        max_grad_norm=config.max_grad_norm,
        expected_batch_size=plan.sample_rate * n,
        rng=rng,
        canary_weight=work.canaries.weight,
        clip=config.max_grad_norm,
    )
    criterion = nn.CrossEntropyLoss()
    gsm.train()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
            for _ in range(steps):
                idx = np.flatnonzero(rng.uniform(n) < plan.sample_rate)
                optimizer.sampled = _canaries_sampled(included, plan.sample_rate, rng)
                if idx.size == 0:
                    optimizer.noise_only_step()
                    continue
                index = torch.from_numpy(idx)
                loss = criterion(gsm(xs[index]), ys[index])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        gsm._close()


def guess_threshold(*, sample_rate: float, steps: int, noise_multiplier: float) -> float:
    """Score above which a canary is guessed "included", from the mechanism's public parameters.

    In units of one sampled step, an excluded canary's score is the noise alone,
    N(0, steps * z^2), and an included one's adds Binomial(steps, q) sampled steps, about
    N(q * steps, steps * (q (1 - q) + z^2)). The threshold is where the two densities cross
    between their means (the likelihood-ratio test for equal priors); without noise it is half a
    step, since an excluded canary never moves. It depends on the settings only, never on the
    scores or on which canaries were included, so the guesses are a function of the model alone
    and their number (every canary) is fixed in advance, as the audit's theorem requires.
    """
    q, t, z = sample_rate, steps, noise_multiplier
    mean = q * t
    if z == 0:
        return 0.5
    var_out, var_in = t * z * z, t * (q * (1 - q) + z * z)

    def log_ratio(x: float) -> float:  # log density(included) - log density(excluded)
        return (-((x - mean) ** 2) / (2 * var_in) - 0.5 * np.log(var_in)) - (
            -(x * x) / (2 * var_out) - 0.5 * np.log(var_out)
        )

    low, high = 0.0, mean
    if not (log_ratio(low) < 0 < log_ratio(high)):
        return mean / 2
    for _ in range(100):
        mid = (low + high) / 2
        if log_ratio(mid) < 0:
            low = mid
        else:
            high = mid
    return (low + high) / 2
