"""``fedcore audit``'s work: audit one site's record-level DP-SGD, and state the audit's power.

Decision (documented in docs/experiments.md, "fedcore audit"): the audit drives fedcore's DP-SGD round
(:func:`fedcore.privacy.dpsgd.train_round`) in-process for a single site (site 0 of the configured
federation, its training split, the configured model, ``local_epochs``, ``batch_size``, ``lr``,
``dp.site.*``, ``rounds``), without Flower: a federation adds nothing to what one site's DP-SGD
releases about that site's records. The canaries are records of that site
(:mod:`fedcore.audit.canaries`). The auditor sees the final model (white-box) and guesses every
canary: "included" when its score is above a threshold computed from the settings alone
(:func:`~fedcore.audit.canaries.guess_threshold`), so the number of guesses is fixed in advance
(all ``m``) and one bound is computed per run, at 95 % confidence (:mod:`fedcore.audit.bound`).

Power. A bound below the claim says nothing unless the same audit would have caught a mechanism
that breaks it. So the audit also runs weakened mechanisms the same way (:data:`CONTROLS`): the
noise off, the clipping off (the clip bound raised far above every gradient, the noise std kept),
and the noise multiplier cut to a half, a quarter and an eighth. Each control's true epsilon is
infinite (no noise, no clipping) or the RDP accountant's bound for its noise (an upper bound, so
the power stated is never overstated); it is *refuted* when its lower bound exceeds the formal
epsilon. ``detects_above`` is the smallest true epsilon among the refuted controls: the audit
would notice a mechanism whose epsilon is above it. ``strong_enough`` means a control with a
finite epsilon was refuted; without one the verdict never says the claim could have been refuted.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from fedcore.audit.bound import epsilon_lower_bound
from fedcore.audit.canaries import CanaryRun, guess_threshold, train_with_canaries
from fedcore.config import Settings
from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError
from fedcore.privacy.dpsgd import SiteDPConfig, SiteRoundPlan, _check_data, plan_round
from fedcore.privacy.events import PoissonSubsampledGaussian
from fedcore.privacy.ledger import PrivacyLedger
from fedcore.protections import RecordLevel, protections_of

CONFIDENCE = 0.95
DEFAULT_CANARIES = 30_000
AUDITED_SITE = 0
NOISE_FRACTIONS = (0.5, 0.25, 0.125)  # the weakened-noise controls: noise multiplier times these
NO_CLIP_BOUND = 1e4  # the no-clipping control's clip bound, in clip norms (canaries: 100)
CONTROL_ACCOUNTANT = "rdp"  # the controls' true epsilons: an upper bound, fast at small noise


@dataclass(frozen=True, slots=True)
class AuditOutcome:
    """One run's guesses and bound."""

    epsilon_lower_bound: float
    guesses: int
    correct: int
    threshold: float
    canaries_included: int


@dataclass(frozen=True, slots=True)
class Control:
    """A weakened mechanism audited the same way; ``epsilon_true`` is ``inf`` (JSON null) for
    one with no finite epsilon."""

    name: str
    epsilon_true: float
    epsilon_lower_bound: float
    refuted: bool  # its lower bound is above the formal epsilon


@dataclass(frozen=True, slots=True)
class AuditReport:
    epsilon_formal: float
    epsilon_lower_bound: float
    confidence: float
    delta: float
    canaries: int
    guesses: int
    correct: int
    control: AuditOutcome  # the noise-off control (kept: results.csv reads it)
    strong_enough: bool
    verdict: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    rounds: int
    train_examples: int
    accountant: str
    grad_sample_mode: str  # the DP-SGD step audited: the one a site runs for this model
    controls: tuple[Control, ...]
    detects_above: float | None  # smallest epsilon_true of a refuted control; None if none

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["controls"] = [asdict(c) for c in self.controls]
        doc["method"] = (
            "one-run audit, Steinke, Nasr and Jagielski (NeurIPS 2023), Theorem 5.2 / Algorithm 2; "
            "white-box Dirac gradient canaries, each included with probability 1/2, as records of "
            f"site {AUDITED_SITE} in its DP-SGD round (its Poisson sampler, clipping and noise); the "
            "auditor sees the final model and guesses every canary; controls: weakened mechanisms "
            f"run the same way (true epsilons by the {CONTROL_ACCOUNTANT} accountant; null: none)"
        )
        return doc


@dataclass(frozen=True, slots=True)
class _Mechanism:
    name: str
    config: SiteDPConfig
    plan: SiteRoundPlan
    epsilon_true: float


def _score(run: CanaryRun, *, delta: float) -> AuditOutcome:
    threshold = guess_threshold(
        sample_rate=run.sample_rate, steps=run.steps, noise_multiplier=run.noise_used
    )
    guesses = run.scores > threshold
    correct = int((guesses == run.included).sum())
    m = len(run.scores)
    eps = epsilon_lower_bound(
        canaries=m, guesses=m, correct=correct, delta=delta, confidence=CONFIDENCE
    )
    return AuditOutcome(eps, m, correct, threshold, int(run.included.sum()))


def _record_level(settings: Settings, canaries: int) -> RecordLevel:
    record = protections_of(settings).record
    if record is None:
        raise ConfigError(
            "the audit checks record-level DP: set dp.site.epsilon "
            "(for example --set dp.site.epsilon=2)"
        )
    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 2:
        raise ConfigError(f"--canaries must be an integer >= 2, got {canaries!r}")
    return record


def _formal_claim(record: RecordLevel, plan: SiteRoundPlan) -> float:
    """What the site's ledger charges for all rounds of ``plan``."""
    ledger = PrivacyLedger(
        scope=record.scope(AUDITED_SITE), budget=record.budget(), accountant=record.accountant
    )
    for r in range(record.planned_rounds):
        ledger.charge(plan.event, round_number=r + 1, label="audited dp-sgd round")
    return ledger.epsilon()


def _mechanisms(record: RecordLevel, config: SiteDPConfig, plan: SiteRoundPlan) -> list[_Mechanism]:
    """The site's mechanism, then the controls: no noise, no clipping, weakened noise."""
    from fedcore.privacy.accountant import epsilon

    def true_epsilon(z: float) -> float:
        steps = plan.steps * record.planned_rounds
        event = PoissonSubsampledGaussian(
            sampling_rate=plan.sample_rate, noise_multiplier=z, count=steps
        )
        absl = logging.getLogger("absl")  # RDP warns of every order it drops: not our news
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            return epsilon(event, delta=record.delta, accountant=CONTROL_ACCOUNTANT)
        finally:
            absl.setLevel(level)

    z, c = plan.noise_multiplier, config.max_grad_norm
    unclipped = replace(config, max_grad_norm=c * NO_CLIP_BOUND)
    out = [
        _Mechanism("as configured", config, plan, math.nan),
        _Mechanism("no noise", config, replace(plan, noise_multiplier=0.0), math.inf),
        _Mechanism(
            "no clipping (clip bound raised, noise std kept)",
            unclipped,
            replace(plan, noise_multiplier=z / NO_CLIP_BOUND),
            math.inf,
        ),
    ]
    for f in NOISE_FRACTIONS:
        weak = replace(plan, noise_multiplier=z * f)
        out.append(_Mechanism(f"noise x{f:g}", config, weak, true_epsilon(z * f)))
    return out


def audit(
    settings: Settings, *, canaries: int = DEFAULT_CANARIES, rng: CryptoRng | None = None
) -> AuditReport:
    """Audit record-level DP-SGD as ``settings`` configure it. Raises :class:`ConfigError`.

    ``rng`` draws the canaries' inclusion, the Poisson samples and the noise (default: a fresh
    CSPRNG; tests pass a seeded one).
    """
    from fedcore.data import load_holdout, load_site
    from fedcore.federation.site.data import data_settings
    from fedcore.models import build_model

    record = _record_level(settings, canaries)
    rng = rng or CryptoRng()
    data = data_settings(settings)
    _, input_shape, num_classes = load_holdout(data)
    site = load_site(data, AUDITED_SITE)
    xs, ys = _check_data(site.train.x, site.train.y)
    config = record.dp_config()  # the DP-SGD settings a federated site trains with
    probe = PrivacyLedger(
        scope=record.scope(AUDITED_SITE), budget=record.budget(), accountant=record.accountant
    )
    plan = plan_round(config, num_examples=len(xs), ledger=probe)
    formal = _formal_claim(record, plan)
    runs: list[tuple[_Mechanism, CanaryRun]] = []
    for mechanism in _mechanisms(record, config, plan):
        torch.manual_seed(settings.seed)
        model = build_model(settings.model, input_shape=input_shape, num_classes=num_classes)
        run = train_with_canaries(
            model,
            xs,
            ys,
            config=mechanism.config,
            plan=mechanism.plan,
            rounds=record.planned_rounds,
            canaries=canaries,
            clip=config.max_grad_norm,
            rng=rng,
        )
        runs.append((mechanism, run))
    return _report(record, runs, formal=formal, canaries=canaries, train_examples=len(xs))


def _report(
    record: RecordLevel,
    runs: list[tuple[_Mechanism, CanaryRun]],
    *,
    formal: float,
    canaries: int,
    train_examples: int,
) -> AuditReport:
    outcomes = [(m, run, _score(run, delta=record.delta)) for m, run in runs]
    (_, audited_run, audited), *rest = outcomes
    controls = tuple(
        Control(m.name, m.epsilon_true, o.epsilon_lower_bound, o.epsilon_lower_bound > formal)
        for m, _, o in rest
    )
    refuted = [c.epsilon_true for c in controls if c.refuted]
    detects_above = min(refuted) if refuted else None
    strong = detects_above is not None and math.isfinite(detects_above)
    ceiling = epsilon_lower_bound(
        canaries=canaries,
        guesses=canaries,
        correct=canaries,
        delta=record.delta,
        confidence=CONFIDENCE,
    )
    plan = runs[0][0].plan
    return AuditReport(
        epsilon_formal=formal,
        epsilon_lower_bound=audited.epsilon_lower_bound,
        confidence=CONFIDENCE,
        delta=record.delta,
        canaries=canaries,
        guesses=audited.guesses,
        correct=audited.correct,
        control=next(o for m, _, o in rest if m.name == "no noise"),
        strong_enough=strong,
        verdict=verdict(
            formal=formal,
            found=audited.epsilon_lower_bound,
            controls=controls,
            detects_above=detects_above,
            ceiling=ceiling,
            canaries=canaries,
        ),
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=audited_run.steps,
        rounds=record.planned_rounds,
        train_examples=train_examples,
        accountant=str(record.accountant),
        grad_sample_mode=audited_run.grad_sample_mode,
        controls=controls,
        detects_above=detects_above,
    )


def verdict(
    *,
    formal: float,
    found: float,
    controls: tuple[Control, ...],
    detects_above: float | None,
    ceiling: float,
    canaries: int,
) -> str:
    """What the audit shows, in one paragraph: the claim refuted or not, and the audit's power."""
    if found > formal:
        result = f"the audit finds {found:.3f} > the formal {formal:.3f}: THE CLAIM IS REFUTED"
    else:
        result = f"the audit finds {found:.3f} <= the formal epsilon {formal:.3f}"
    if ceiling <= formal:
        return (
            f"too weak: too few canaries for any power: with {canaries} canaries even every guess "
            f"right gives a lower bound of at most {ceiling:.3f}, not above the formal "
            f"{formal:.3f}, so no mechanism, however broken, could be refuted; use more --canaries "
            f"or a larger delta. {result}"
        )
    if detects_above is None or not math.isfinite(detects_above):
        caught = [c.name for c in controls if c.refuted] or ["none"]
        return (
            f"too weak: no weakened mechanism with a finite epsilon was refuted (refuted: "
            f"{', '.join(caught)}), so this audit could not have refuted a claim that is merely "
            f"too small; use more --canaries or a larger delta. {result}"
        )
    weakest = min((c for c in controls if c.refuted), key=lambda c: c.epsilon_true)
    return (
        f"this audit would notice a mechanism whose epsilon is above {detects_above:.3g} (it "
        f"refuted the control '{weakest.name}', true epsilon {detects_above:.3g}); {result}"
    )
