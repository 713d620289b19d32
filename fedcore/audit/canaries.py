"""White-box gradient canaries as records of a site, trained by fedcore's own DP-SGD loop.

Theory of operation. The audit of Steinke, Nasr and Jagielski (NeurIPS 2023, section 6, the
white-box setting with Dirac canaries): each of ``m`` canaries is a *record* included in the
site's data with probability 1/2, whose gradient points along one coordinate of its own. The
canaries go through the site's real DP-SGD round, :func:`fedcore.privacy.dpsgd.train_round`:
its Poisson sampler draws them with the site's rate ``q``, its clipper (the step a site runs for
this model) clips their gradients, its release adds the noise. Nothing of the loop is copied here.
After training, the auditor (who sees the final model) scores each canary by how far its
coordinate moved against its gradient, and guesses which were included.

The canary coordinates are the ``R x K`` weights of a ``Linear(K, R)`` (``R K >= m``) that real
records never reach (their canary inputs are 0). A canary record ``i = r K + c`` feeds the one-hot
``e_c`` to that layer and selects output ``r``; its logits are ``[-k v, L, 0, ...]`` with label 0,
``v`` the selected output, ``L`` = :data:`LOGIT_GAP` and ``k`` = :data:`CANARY_GRADIENT` times the
clip norm ``C``. With ``L`` that large the cross entropy is ``k v + L`` to float32 precision, so
the canary's gradient is exactly ``k`` on weight ``(r, c)`` and 0 elsewhere (the data model's
output is masked to 0 on canary rows): a Dirac gradient of norm ``k = 100 C``, which the real
clipping must bring down to ``C``. An audit therefore notices a step that does not clip.

The site's plan (``q``, steps, noise multiplier) is computed from its own records; the canaries
are sampled at that ``q``, which is what each record's guarantee depends on (the event is the
Poisson-subsampled Gaussian per record, whatever the data set's size). The update divides by
``q`` times all records, canaries included: a scale that is post-processing, undone in the scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn

from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError
from fedcore.privacy.dpsgd import (
    SiteDPConfig,
    SiteRoundPlan,
    _private_copy,
    _resolve_mode,
    train_round,
)

CANARY_GRADIENT = 100.0  # a canary's gradient norm, in clip norms: only clipping bounds it
LOGIT_GAP = 1e4  # the constant logit beside a canary's: makes its loss linear in its weight


class WithCanaries(nn.Module):
    """``model`` plus ``m`` canary weights; inputs are rows ``[x flattened, e_c, e_r]``."""

    def __init__(self, model: nn.Module, m: int, *, input_shape: tuple[int, ...], k: float) -> None:
        super().__init__()
        self.model = model
        self.input_shape = input_shape
        self.width = math.prod(input_shape)
        self.cols = math.ceil(math.sqrt(m))
        self.rows = math.ceil(m / self.cols)
        self.k = k
        self.canaries = nn.Linear(self.cols, self.rows, bias=False)
        nn.init.zeros_(self.canaries.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, c = self.width, self.cols
        data = x[:, :d].reshape(-1, *self.input_shape)
        select = x[:, d + c :]
        is_canary = select.sum(dim=1, keepdim=True)  # 1 on canary rows, 0 on the site's records
        logits = self.model(data)
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ConfigError(f"the audit needs a classifier with >= 2 classes, got {logits.shape}")
        logits = logits * (1 - is_canary)
        v = (self.canaries(x[:, d : d + c]) * select).sum(dim=1, keepdim=True)
        canary = torch.zeros_like(logits)
        canary[:, :1] = -self.k * v
        canary[:, 1:2] = LOGIT_GAP
        return logits + canary * is_canary

    def scores(self, m: int) -> np.ndarray:
        """Each canary's movement against its gradient (its weight, negated)."""
        return -self.canaries.weight.detach().double().cpu().reshape(-1).numpy()[:m]


@dataclass(frozen=True, slots=True)
class CanaryRecords:
    """The site's records followed by the included canaries (a :class:`~fedcore.privacy.dpsgd.Records`)."""

    x: torch.Tensor
    y: torch.Tensor
    ids: np.ndarray  # the included canaries, in record order after the site's records
    work: WithCanaries

    def __len__(self) -> int:
        return len(self.x) + len(self.ids)

    def batch(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        n, w = len(self.x), self.work
        out = torch.zeros(len(index), w.width + w.cols + w.rows)
        labels = torch.zeros(len(index), dtype=torch.int64)  # a canary's label is class 0
        real = index < n
        at = torch.from_numpy(index[real])
        out[torch.from_numpy(real), : w.width] = self.x[at].reshape(len(at), w.width)
        labels[torch.from_numpy(real)] = self.y[at]
        rows = torch.from_numpy(np.flatnonzero(~real))
        ids = torch.from_numpy(self.ids[index[~real] - n])
        out[rows, w.width + ids % w.cols] = 1.0
        out[rows, w.width + w.cols + ids // w.cols] = 1.0
        return out, labels


@dataclass(frozen=True, slots=True)
class CanaryRun:
    """The result of one training run with canaries."""

    scores: np.ndarray  # per canary: movement against its gradient, in units of one sampled step
    included: np.ndarray  # bool per canary: the secret the auditor guesses
    noise_used: float  # the noise std the run added, in units of one sampled canary step
    sample_rate: float
    steps: int  # all rounds together
    grad_sample_mode: str  # the step that ran: what a site would run for this model


def train_with_canaries(
    model: nn.Module,
    xs: torch.Tensor,
    ys: torch.Tensor,
    *,
    config: SiteDPConfig,
    plan: SiteRoundPlan,
    rounds: int,
    canaries: int,
    clip: float,
    rng: CryptoRng,
) -> CanaryRun:
    """``rounds`` rounds of the site's DP-SGD (:func:`~fedcore.privacy.dpsgd.train_round`) on
    ``(xs, ys)`` plus ``canaries`` Dirac canaries, each included with probability 1/2.

    ``config`` and ``plan`` are the mechanism run: the site's, or a weakened one (the audit's
    controls: a larger clip norm, a smaller noise multiplier). Canary gradients are
    :data:`CANARY_GRADIENT` times ``clip``, the site's configured clip norm. Scores and noise are
    in units of what one sampled step of a canary moves its weight if the step clips as
    ``config`` says (``C`` for the site's mechanism). Raises :class:`ConfigError`.
    """
    if canaries < 2:
        raise ConfigError(f"an audit needs at least 2 canaries, got {canaries}")
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    included = rng.uniform(canaries) < 0.5
    shape = tuple(xs.shape[1:])
    k = CANARY_GRADIENT * clip
    work = cast(WithCanaries, _private_copy(WithCanaries(model, canaries, input_shape=shape, k=k)))
    records = CanaryRecords(xs, ys, np.flatnonzero(included), work)
    mode = _resolve_mode(config.grad_sample_mode, work, probe=records.batch(np.arange(2))[0])
    for _ in range(rounds):  # as a site: a fresh step (and optimiser) each round
        train_round(work, records, config=config, plan=plan, mode=mode, rng=rng)
    step = min(k, config.max_grad_norm)  # a sampled canary's clipped gradient, as claimed
    unit = config.lr * step / (plan.sample_rate * len(records))
    return CanaryRun(
        scores=work.scores(canaries) / unit,
        included=included,
        noise_used=plan.noise_multiplier * config.max_grad_norm / step,
        sample_rate=plan.sample_rate,
        steps=plan.steps * rounds,
        grad_sample_mode=mode.value,
    )


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
