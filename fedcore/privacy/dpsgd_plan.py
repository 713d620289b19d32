"""A site's DP-SGD round planned before any data is touched: the settings, the sampling rate, the
steps, the noise multiplier (given or calibrated) and the privacy event a round will be charged.

Apart from :mod:`fedcore.privacy.dpsgd` (which trains, and imports torch and Opacus) so that the
checks before a run (:func:`fedcore.federation.site.folders.check_site_round`) cost no Opacus import.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from fedcore.errors import ConfigError
from fedcore.privacy.accountant import calibrate_noise_multiplier
from fedcore.privacy.events import PoissonSubsampledGaussian
from fedcore.privacy.ledger import PrivacyLedger


class GradSampleMode(enum.Enum):
    """How per-example gradients are clipped. Every mode clips the same way (Opacus's clip factor
    on each example's whole gradient); they differ in cost and in the layers they support."""

    AUTO = "auto"  # ghost where supported, else opacus-ghost, else hooks
    GHOST = "ghost"  # fedcore's fused clipper (fedcore.privacy.fused_clip); opacus-ghost otherwise
    OPACUS_GHOST = "opacus-ghost"  # Opacus's ghost clipping (two backward passes)
    HOOKS = "hooks"  # Opacus's per-sample gradient hooks


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteDPConfig:
    """DP-SGD settings of a site. Give ``noise_multiplier``, or ``planned_rounds`` to calibrate
    it from the ledger's budget over ``planned_rounds * epochs`` epochs."""

    epochs: int
    batch_size: int
    lr: float
    max_grad_norm: float
    noise_multiplier: float | None = None
    planned_rounds: int | None = None
    momentum: float = 0.0
    grad_sample_mode: GradSampleMode = GradSampleMode.AUTO

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("lr", "max_grad_norm"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be finite and > 0, got {value!r}")
        if self.noise_multiplier is None:
            if not isinstance(self.planned_rounds, int) or self.planned_rounds < 1:
                raise ConfigError(
                    "dp.site.noise_multiplier is absent, so planned_rounds (>= 1) is needed to "
                    f"calibrate it; got planned_rounds={self.planned_rounds!r}"
                )
        elif not isinstance(self.noise_multiplier, int | float) or not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0
        ):
            raise ConfigError(
                f"dp.site.noise_multiplier must be finite and > 0, got {self.noise_multiplier!r}"
            )
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not isinstance(self.grad_sample_mode, GradSampleMode):
            raise ConfigError(
                f"grad_sample_mode must be a GradSampleMode, got {self.grad_sample_mode!r}"
            )


@dataclass(frozen=True, slots=True)
class SiteRoundPlan:
    """What a round will cost, known before any data is touched."""

    sample_rate: float
    steps: int
    noise_multiplier: float
    event: PoissonSubsampledGaussian


def plan_round(config: SiteDPConfig, *, num_examples: int, ledger: PrivacyLedger) -> SiteRoundPlan:
    """The sampling rate, steps, noise multiplier and event of one round; charges nothing.

    A calibrated noise multiplier depends only on the budget and the plan, not on what was
    spent, so every round of a plan gets the same one. Raises :class:`ConfigError`.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ConfigError(f"a site needs at least one training example, got {num_examples!r}")
    q = min(1.0, config.batch_size / num_examples)
    steps = config.epochs * max(1, round(1 / q))
    z = config.noise_multiplier
    if z is None:
        assert config.planned_rounds is not None  # checked by SiteDPConfig
        z = calibrate_noise_multiplier(
            target_epsilon=ledger.budget.epsilon,
            delta=ledger.budget.delta,
            sample_rate=q,
            steps=steps * config.planned_rounds,
            accountant=ledger.accountant,
        )
    event = PoissonSubsampledGaussian(sampling_rate=q, noise_multiplier=float(z), count=steps)
    return SiteRoundPlan(sample_rate=q, steps=steps, noise_multiplier=float(z), event=event)
