"""Which protections a run has, resolved once from its settings: the one place that reads them.

A run stacks up to three protections, each optional (README, "What is protected, against whom"; docs/privacy.md):

1. **Record-level DP** at each site (DP-SGD): :attr:`Protections.record`, a :class:`RecordLevel`.
2. **Secure aggregation**: :attr:`Protections.secagg`, a :class:`SecureAggregation`.
3. **Site-level DP** on the aggregate: :attr:`Protections.mechanism`, one object per mechanism
   (:mod:`fedcore.mechanisms`): the Gaussian at a trusted server (DP-FedAvg), the same Gaussian
   on the securely aggregated sum, or distributed discrete noise added by each site before
   masking (``dp.distributed.*``, :mod:`fedcore.mechanisms.distributed`).

Everything else asks this object, never the raw ``dp.*`` settings: whether a protection is on,
its parameters, the cross-checks between protections (:meth:`Protections.check`), what a run may
publish (:class:`Publication`) and how it is described to a person (:meth:`Protections.describe`).
A new mechanism is a new file in :mod:`fedcore.mechanisms` and a new case of
:meth:`Protections.from_settings`; nothing else branches on it.

:func:`protections_of` caches one object per :class:`~fedcore.config.Settings` (frozen, so
hashable): a site that answers many messages of one run resolves its protections once.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedcore.config import LINEAR_STRATEGIES, NONLINEAR_STRATEGIES, Settings, SiteDPSettings
from fedcore.errors import ConfigError
from fedcore.mechanisms import BudgetAgainst, CentralGaussian, Clip, Mechanism
from fedcore.secagg.config import Mode

if TYPE_CHECKING:
    from fedcore.mechanisms.distributed import DistributedDP
    from fedcore.privacy import Budget, Scope
    from fedcore.privacy.dpsgd_plan import SiteDPConfig

# The neighbouring relation of record-level DP, named once (record, summary, README).
RECORD_RELATION = (
    "add or remove one training record of a site (the site reports weight 1, not its example count)"
)


@dataclass(frozen=True, slots=True)
class RecordLevel:
    """Record-level DP-SGD at each site: every site's own budget, ledger and noise.

    The guarantee holds for each site's training records, against everyone who sees what the site
    sends (the server, other sites, observers of the models), under :data:`RECORD_RELATION`.
    """

    epsilon: float
    delta: float
    noise_multiplier: float | None
    max_grad_norm: float
    accountant: str
    epochs: int
    batch_size: int
    lr: float
    planned_rounds: int

    relation: str = RECORD_RELATION

    @classmethod
    def from_settings(cls, settings: Settings) -> RecordLevel | None:
        dp: SiteDPSettings = settings.dp.site
        if dp.epsilon is None:
            return None
        return cls(
            epsilon=dp.epsilon,
            delta=dp.delta,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            accountant=settings.dp.accountant,
            epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            lr=settings.lr,
            planned_rounds=settings.rounds,
        )

    @property
    def calibrated(self) -> bool:
        """Whether the noise multiplier is calibrated over the planned rounds (not given)."""
        return self.noise_multiplier is None

    def budget(self) -> Budget:
        from fedcore.privacy import Budget

        return Budget(epsilon=self.epsilon, delta=self.delta)

    def scope(self, site_id: int) -> Scope:
        from fedcore.privacy import Scope, ScopeKind

        return Scope(ScopeKind.SITE_RECORDS, f"site-{site_id}")

    def dp_config(self) -> SiteDPConfig:
        """The site's DP-SGD configuration (:class:`~fedcore.privacy.dpsgd_plan.SiteDPConfig`)."""
        from fedcore.privacy.dpsgd_plan import SiteDPConfig

        return SiteDPConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            max_grad_norm=self.max_grad_norm,
            noise_multiplier=self.noise_multiplier,
            planned_rounds=self.planned_rounds,
        )


@dataclass(frozen=True, slots=True)
class SecureAggregation:
    """Secure aggregation, with the library's own enum for its threat model."""

    mode: Mode
    neighbors: int  # 0: the complete graph, else the even k of the SecAgg+ Harary graph
    threshold: int | None
    bits: int
    clip_range: float
    timeout: float
    allow_unsafe: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> SecureAggregation | None:
        s = settings.secagg
        if not s.enabled:
            return None
        return cls(
            mode=Mode.ACTIVE if s.mode == "active" else Mode.SEMI_HONEST,
            neighbors=0 if s.neighbors == "complete" else int(s.neighbors),
            threshold=s.threshold,
            # under distributed DP the ring is its own setting (the noise and the sum must fit it)
            bits=s.bits
            if settings.dp.distributed.epsilon is None
            else settings.dp.distributed.bits,
            clip_range=s.clip_range,
            timeout=s.timeout,
            allow_unsafe=s.allow_unsafe,
        )

    @property
    def mode_name(self) -> str:
        """The mode as the settings and the record spell it."""
        return "active" if self.mode is Mode.ACTIVE else "semi-honest"

    def neighbors_for(self, sites: int) -> int:
        """0 for the complete graph, else k (complete, 0, when k >= sites - 1)."""
        return 0 if self.neighbors >= sites - 1 else self.neighbors

    def round_shape(self, sites: int) -> tuple[int, int] | None:
        """``(threshold, neighbours)`` of a round of ``sites`` sites, or None when the protocol
        cannot run with so few (the server's plan: :class:`~fedcore.federation.server.
        secagg_round.SecAggTrainRound`)."""
        from fedcore.secagg.config import default_threshold

        if sites < 2:
            return None
        k = self.neighbors_for(sites)
        threshold = self.threshold or default_threshold(sites, neighbors=k, mode=self.mode)
        return (threshold, k) if threshold <= sites else None

    def runs_at(self, sites: int) -> bool:
        """Whether a round of ``sites`` sampled sites runs: the server plans it and a site with the
        default floors accepts it (:mod:`fedcore.privacy.skips` charges what this reveals)."""
        from fedcore.secagg.floors import safe_threshold

        shape = self.round_shape(sites)
        if shape is None:
            return False
        if self.allow_unsafe:
            return True
        threshold, k = shape
        try:
            return threshold >= safe_threshold(sites, neighbors=k, mode=self.mode)
        except ConfigError:
            return False


# Under site-level DP: every per-round field that depends on who was sampled or who answered.
SITE_LEVEL_WITHHELD = (
    "sites_sampled",
    "sites_replied",
    "sites_failed",
    "sites_declined",
    "train_loss",
    "num_examples",
    "site_eval_loss",
    "site_eval_accuracy",
    "failures",
    "site_epsilon",
    "bytes_down",
    "bytes_up",
    "secagg",
    "round_failed",  # whether every sampled site failed: a function of the sample and the sites
    "server_epsilon_sample_known_realised",  # grows with the most-sampled site's count
)
# With record-level DP only (DP-SGD): what is computed from training records without noise. A
# site's evaluation on its own test split stays, labelled as outside the guarantee.
RECORD_LEVEL_WITHHELD = ("train_loss", "num_examples")


class Audience(enum.Enum):
    """Who may read a file or a line a run writes."""

    PUBLIC = "public"  # history.jsonl, privacy.json, summary.md, plots, logs, experiment results
    OPERATOR = "operator"  # operator.jsonl (owner-only)


@dataclass(frozen=True, slots=True)
class Publication:
    """What a run may publish, decided once from its protections (the record, the report, the
    progress line and the experiment runner all read this).

    Under site-level DP the amplified epsilon assumes the sample secret: nothing public may depend
    on who was sampled, so every per-round quantity that does (losses, example counts, how many
    sites were sent, replied or declined, per-site epsilons, bytes by site, the realised
    sample-known epsilon) goes to the operator only.
    """

    sample_hidden: bool
    record_dp: bool

    def withheld_fields(self) -> tuple[str, ...]:
        """The history fields written to ``operator.jsonl`` instead of ``history.jsonl``."""
        if self.sample_hidden:
            return SITE_LEVEL_WITHHELD
        if self.record_dp:
            return RECORD_LEVEL_WITHHELD
        return ()

    def audience(self, field: str) -> Audience:
        return Audience.OPERATOR if field in self.withheld_fields() else Audience.PUBLIC


@dataclass(frozen=True, slots=True)
class Protections:
    """A run's protections. Build with :func:`protections_of` (cached) or :meth:`from_settings`."""

    record: RecordLevel | None
    secagg: SecureAggregation | None
    mechanism: Mechanism | None
    accountant: str
    state_dir: str = ""  # dp.server.state_dir: the federation's folder kept across runs

    @classmethod
    def from_settings(cls, settings: Settings) -> Protections:
        """Resolve and cross-check. Raises :class:`ConfigError` naming the settings involved."""
        secagg = SecureAggregation.from_settings(settings)
        made = cls(
            record=RecordLevel.from_settings(settings),
            secagg=secagg,
            mechanism=mechanism_for(settings, secagg=secagg is not None),
            accountant=settings.dp.accountant,
            state_dir=settings.dp.server.state_dir,
        )
        made.check(settings)
        return made

    # -- answers --------------------------------------------------------------------------

    @property
    def distributed(self) -> DistributedDP | None:
        """The distributed-DP mechanism when it is the run's (a site's budget against the server)."""
        from fedcore.mechanisms.distributed import DistributedDP

        return self.mechanism if isinstance(self.mechanism, DistributedDP) else None

    @property
    def any_dp(self) -> bool:
        return self.record is not None or self.mechanism is not None

    @property
    def publication(self) -> Publication:
        return Publication(
            sample_hidden=self.mechanism is not None, record_dp=self.record is not None
        )

    def receipts_folder(self, record_dir: Path) -> Path | None:
        """Where the federation keeps what it saw each site spend
        (:mod:`fedcore.federation.server.receipts`): ``dp.server.state_dir`` (across runs), else the
        run record; None when record-level DP is off (sites report no spend)."""
        if self.record is None:
            return None
        return Path(self.state_dir) if self.state_dir else record_dir

    @property
    def calibrated_over_rounds(self) -> bool:
        """Whether some noise multiplier was calibrated over ``rounds`` (so rounds cannot change
        on resume)."""
        return (self.record is not None and self.record.calibrated) or (
            self.mechanism is not None and self.mechanism.calibrated
        )

    # -- cross-checks ---------------------------------------------------------------------

    def check(self, settings: Settings) -> None:
        """Every rule between protections and the rest of the settings (the ring's fit against a
        model needs the model: :meth:`Mechanism.check_before_run`)."""
        if self.secagg is not None:
            if settings.sites < 2:
                raise ConfigError(
                    f"secure aggregation needs at least 2 sites, got sites={settings.sites}"
                )
            if settings.strategy in NONLINEAR_STRATEGIES:
                raise ConfigError(nonlinear_refusal(settings.strategy))
            if not self.secagg.allow_unsafe:
                _check_secagg_safety(settings, self.secagg)
        if self.record is not None and settings.strategy == "fedprox":
            raise ConfigError(
                "strategy 'fedprox' adds a proximal term that DP-SGD does not support; use fedavg "
                "or fedadam"
            )

    # -- words ----------------------------------------------------------------------------

    def describe(self) -> str:
        """One line per protection, as the summary and the CLI print them."""
        parts = []
        if self.record is not None:
            parts.append(
                f"record-level DP (DP-SGD at each site, epsilon {self.record.epsilon:g}, "
                f"delta {self.record.delta:g})"
            )
        if self.secagg is not None:
            graph = "complete graph" if self.secagg.neighbors == 0 else f"k={self.secagg.neighbors}"
            parts.append(f"secure aggregation ({self.secagg.mode_name}, {graph})")
        if self.mechanism is not None:
            parts.append(self.mechanism.describe())
        return "; ".join(parts) if parts else "none (plain federated averaging)"


def nonlinear_refusal(strategy: str) -> str:
    """The one message for a strategy secure aggregation cannot serve."""
    return (
        f"strategy {strategy!r} needs every site's individual update, which secure aggregation "
        f"hides; use a linear strategy ({', '.join(LINEAR_STRATEGIES)})"
    )


def _check_secagg_safety(settings: Settings, secagg: SecureAggregation) -> None:
    """``secagg.threshold`` and ``secagg.neighbors`` against the protocol's safe rules for a round
    of all ``sites`` (:mod:`fedcore.secagg.floors`, the rules every site enforces by default)."""
    from fedcore.secagg.floors import safe_threshold

    n = settings.sites
    k = secagg.neighbors_for(n)
    try:
        floor = safe_threshold(n, neighbors=k, mode=secagg.mode)
    except ConfigError as exc:
        raise ConfigError(
            f"setting 'secagg.neighbors' is {settings.secagg.neighbors!r}: {exc} "
            "(set 'secagg.allow_unsafe=true' to run it anyway, for experiments)"
        ) from None
    threshold = secagg.threshold
    if threshold is not None and threshold < floor:
        raise ConfigError(
            f"setting 'secagg.threshold' is {threshold}, below the safe {floor} for {n} sites "
            f"({'complete graph' if k == 0 else f'{k} neighbours'}, {secagg.mode_name} mode); "
            "sites refuse such a round (set 'secagg.allow_unsafe=true' for experiments)"
        )


def mechanism_for(settings: Settings, *, secagg: bool) -> Mechanism | None:
    """The run's site-level DP mechanism, or None when site-level DP is off."""
    dp = settings.dp.server
    if settings.dp.distributed.epsilon is not None:
        if dp.epsilon is not None:
            raise ConfigError(
                f"settings 'dp.distributed.epsilon' ({settings.dp.distributed.epsilon:g}) and "
                f"'dp.server.epsilon' ({dp.epsilon:g}) are both set: choose one site-level mechanism"
            )
        return _distributed(settings, secagg=secagg)
    if dp.epsilon is None:
        return None
    common = dict(
        epsilon=dp.epsilon,
        delta=dp.delta,
        noise_multiplier=dp.noise_multiplier,
        clip_norm=dp.clip_norm,
        clip=Clip(dp.clipping),
        budget_against=BudgetAgainst(dp.budget_against),
        state_dir=dp.state_dir,
        accountant=settings.dp.accountant,
        sites=settings.sites,
        rounds=settings.rounds,
        sampling_rate=settings.fraction_train,
    )
    if secagg:
        from fedcore.mechanisms.central_on_secagg import CentralOnSecAgg
        from fedcore.privacy.skips import skip_reveal_probability

        shapes = SecureAggregation.from_settings(settings)
        assert shapes is not None
        skips = skip_reveal_probability(
            sites=settings.sites, rate=settings.fraction_train, runs=shapes.runs_at
        )
        return CentralOnSecAgg(ring_bits=settings.secagg.bits, skip_probability=skips, **common)
    return CentralGaussian(**common)


def _distributed(settings: Settings, *, secagg: bool) -> Mechanism:
    """Distributed DP (``dp.distributed.*``); ConfigError unless secure aggregation is on."""
    from fedcore.mechanisms.distributed import DistributedDP

    dd = settings.dp.distributed
    if not secagg:
        raise ConfigError(
            f"setting 'dp.distributed.epsilon' is {dd.epsilon:g} but 'secagg.enabled' is false: "
            "distributed DP adds the noise under secure aggregation; set 'secagg.enabled=true'"
        )
    s = settings.secagg
    return DistributedDP(
        epsilon=float(dd.epsilon),  # type: ignore[arg-type]
        delta=dd.delta,
        noise_multiplier=None,
        clip_norm=dd.clip_norm,
        clip=Clip.FIXED,
        budget_against=BudgetAgainst.SAMPLE_KNOWN,  # the server knows who took part
        state_dir=settings.dp.server.state_dir,
        accountant=settings.dp.accountant,
        sites=settings.sites,
        rounds=settings.rounds,
        sampling_rate=settings.fraction_train,
        noise=dd.mechanism,
        bits=dd.bits,
        dropout_tolerance=dd.dropout_tolerance,
        colluders=dd.colluders,
        neighbors=0 if s.neighbors == "complete" else int(s.neighbors),
        mode=Mode.ACTIVE if s.mode == "active" else Mode.SEMI_HONEST,
    )


@functools.lru_cache(maxsize=64)
def protections_of(settings: Settings) -> Protections:
    """The run's :class:`Protections` (cached per settings). Raises :class:`ConfigError`."""
    return Protections.from_settings(settings)
