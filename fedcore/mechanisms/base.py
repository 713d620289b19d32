"""What every site-level DP mechanism is: one object with a site half and a server half.

The shape is pfl-research's split mechanisms (``pfl/privacy/privacy_mechanism.py``:
``SplitPrivacyMechanism.constrain_sensitivity`` at the user, ``add_noise`` at the server): the
*site half* is what a site does to its update before it leaves (clip; under secure aggregation,
encode for the session), the *server half* what the server does with the aggregate (decode, noise,
rescale), and the mechanism reports the privacy event a round implies. The server round, the site,
the ledger and the run record treat every mechanism alike, through this base class.

Theory of operation, common to every site-level mechanism here. The neighbouring relation against
observers of the released models who do not know the sample is *add or remove one whole site*
(its whole update, every round), with amplification by Poisson sampling of the sites
(:meth:`SiteLevelDP.round_event`). Against an observer who knows the sample, a site that was not
sampled is not hidden: the epsilon holds for *zero-out* (the site takes part and contributes
nothing) without amplification (:meth:`SiteLevelDP.sample_known_event`).

Imports stay light (no dp-accounting, no numpy at import): a deployed site resolves its
protections in every fresh ClientApp process.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from fedcore.errors import ConfigError
from fedcore.privacy.relations import SiteRelation

if TYPE_CHECKING:
    from fedcore.privacy import Budget, PrivacyEvent, PrivacyLedger, Scope
    from fedcore.privacy.dpfedavg import ServerDPConfig
    from fedcore.privacy.events import GaussianEvent


class BudgetAgainst(enum.Enum):
    """Which epsilon a site-level budget binds."""

    OBSERVERS = "observers"  # observers of the models who do not know the sample (amplified)
    SAMPLE_KNOWN = "sample-known"  # observers who know which sites took part (not amplified)


class Clip(enum.Enum):
    """The clipping norm of each site's update: fixed, or adaptive (Andrew et al., NeurIPS 2021)."""

    FIXED = "fixed"
    ADAPTIVE = "adaptive"


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteLevelDP:
    """The parameters every site-level mechanism shares, and its ledger.

    Subclasses say where the noise is added (``name``, ``on_secagg``) and supply their halves.
    """

    name: ClassVar[str]
    on_secagg: ClassVar[bool]
    relation: ClassVar[str] = SiteRelation.ADD_REMOVE.value
    sample_known_relation: ClassVar[str] = SiteRelation.ZERO_OUT.value

    epsilon: float
    delta: float
    noise_multiplier: float | None
    clip_norm: float
    clip: Clip
    budget_against: BudgetAgainst
    state_dir: str
    accountant: str
    sites: int
    rounds: int
    sampling_rate: float

    @property
    def calibrated(self) -> bool:
        """Whether the noise multiplier is calibrated over the planned rounds (not given)."""
        return self.noise_multiplier is None

    @property
    def adaptive(self) -> bool:
        return self.clip is Clip.ADAPTIVE

    @property
    def round_reveal(self) -> float:
        """The probability, per round, that the round's outcome reveals a site's presence beyond
        the noised sum (:class:`~fedcore.privacy.events.RevealedWithProbability`); 0 here."""
        return 0.0

    # -- the accounting -------------------------------------------------------------------

    def server_config(self) -> ServerDPConfig:
        """DP-FedAvg's configuration; the noise multiplier is calibrated over all rounds if unset.

        With ``budget_against = sample-known`` the calibration assumes a site may take part in
        every round (sampling rate 1, no amplification)."""
        return _server_config(self)

    def round_event(self) -> PrivacyEvent:
        """The event one round charges to the federation ledger (amplified by sampling)."""
        return self.server_config().round_event()

    def sample_known_event(self) -> GaussianEvent:
        """One round's event for a participating site against an observer who knows the sample."""
        return self.server_config().sample_known_event()

    def budget(self) -> Budget:
        from fedcore.privacy import Budget

        return Budget(epsilon=self.epsilon, delta=self.delta)

    def scope(self) -> Scope:
        from fedcore.privacy import Scope, ScopeKind

        return Scope(ScopeKind.FEDERATION_SITES, "federation")

    def state_folder(self, record_dir: Path) -> Path:
        """Where the federation ledger lives: ``dp.server.state_dir``, else the run record."""
        folder = Path(self.state_dir) if self.state_dir else Path(record_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create dp.server.state_dir {str(folder)!r}: {exc}") from None
        return folder

    @property
    def persistent(self) -> bool:
        """Whether the federation ledger is kept across runs (``dp.server.state_dir`` set)."""
        return bool(self.state_dir)

    def open_ledger(self, record_dir: Path) -> PrivacyLedger:
        """Open the federation ledger (in :meth:`state_folder`).

        Raises :class:`~fedcore.errors.LedgerLostError` for a ledger missing or older than its seal.
        """
        from fedcore.privacy import PrivacyLedger
        from fedcore.privacy.ledger import FEDERATION_LEDGER_FILE
        from fedcore.privacy.sample_known import TALLY_FILE

        folder = self.state_folder(record_dir)
        return PrivacyLedger.open(
            folder / FEDERATION_LEDGER_FILE,
            scope=self.scope(),
            budget=self.budget(),
            accountant=self.accountant,
            # a participation tally means rounds were released here: a missing ledger is a lost one
            released=(folder / TALLY_FILE).exists(),
        )

    def check_before_run(self, *, dim: int, record_dir: Path | None = None) -> None:
        """Refuse, before anything starts, a run that cannot work: a budget (what is left of it,
        with ``dp.server.state_dir``) that one round cannot afford, and whatever the subclass adds
        (:meth:`_check_fit`). Reads the ledger without writing it. Raises :class:`ConfigError`."""
        self._check_fit(dim=dim)
        check_affordable(self, record_dir=record_dir)

    def _check_fit(self, *, dim: int) -> None:
        """What else must hold before the run (a ring's fit, under secure aggregation)."""

    # -- words ----------------------------------------------------------------------------

    def describe(self) -> str:
        noise = "calibrated" if self.calibrated else f"{self.noise_multiplier:g}"
        return (
            f"site-level DP ({self.title}, epsilon {self.epsilon:g}, delta {self.delta:g}, "
            f"binding {self.budget_against.value}, noise multiplier {noise}, clip "
            f"{self.clip.value} {self.clip_norm:g})"
        )

    @property
    def title(self) -> str:
        return self.name

    @property
    def noise_description(self) -> str:
        """The noise the mechanism adds, as ``privacy.json`` names it (``noise``)."""
        from fedcore.privacy.noise import MECHANISM

        return MECHANISM


@functools.lru_cache(maxsize=64)
def _server_config(mechanism: SiteLevelDP) -> ServerDPConfig:
    from fedcore.privacy import calibrate_noise_multiplier
    from fedcore.privacy.dpfedavg import Clipping, ServerDPConfig, SiteSampling
    from fedcore.privacy.skips import delta_used

    noise = mechanism.noise_multiplier
    if noise is None:
        left = mechanism.delta - delta_used(mechanism.round_reveal, mechanism.rounds)
        if not left > 0:
            mechanism._check_fit(dim=1)  # raises, naming the settings
        noise = calibrate_noise_multiplier(
            target_epsilon=mechanism.epsilon,
            delta=left,
            sample_rate=1.0
            if mechanism.budget_against is BudgetAgainst.SAMPLE_KNOWN
            else mechanism.sampling_rate,
            steps=mechanism.rounds,
            accountant=mechanism.accountant,
        )
    return ServerDPConfig(
        total_sites=mechanism.sites,
        sites_per_round=mechanism.sampling_rate * mechanism.sites,
        noise_multiplier=float(noise),
        clip_norm=mechanism.clip_norm,
        clipping=Clipping(mechanism.clip.value),
        sampling=SiteSampling.POISSON,
        reveal_probability=mechanism.round_reveal,
    )


def check_affordable(mechanism: SiteLevelDP, *, record_dir: Path | None) -> None:
    """Raise :class:`ConfigError` if one more round would pass the budget: the ledger's (observers
    who do not know the sample) always, and with ``budget_against = sample-known`` the epsilon of a
    site that takes part once more."""
    from fedcore.privacy import PrivacyLedger, epsilon
    from fedcore.privacy.ledger import FEDERATION_LEDGER_FILE
    from fedcore.privacy.sample_known import TALLY_FILE, ParticipationTally, sample_known_epsilon

    folder = Path(mechanism.state_dir) if mechanism.state_dir else record_dir
    path = None if folder is None else folder / FEDERATION_LEDGER_FILE
    entries = PrivacyLedger.load(path).entries if path is not None and path.exists() else ()
    ledger = PrivacyLedger(
        scope=mechanism.scope(),
        budget=mechanism.budget(),
        accountant=mechanism.accountant,
        entries=entries,
    )
    config = mechanism.server_config()
    event = config.round_event()
    after = ledger.epsilon_if_charged(event)
    spent = ledger.epsilon()
    if after > mechanism.epsilon:
        cost = epsilon([event], delta=mechanism.delta, accountant=mechanism.accountant)
        raise ConfigError(
            f"dp.server.epsilon={mechanism.epsilon:g} cannot afford one round: one round costs "
            f"epsilon {cost:.4g} (noise multiplier {config.noise_multiplier:.4g}, sampling rate "
            f"{config.sampling_rate:g}){f', and {spent:.4g} is already spent' if spent else ''}; "
            "raise the budget or the noise multiplier"
        )
    if mechanism.budget_against is not BudgetAgainst.SAMPLE_KNOWN:
        return
    tally = ParticipationTally.open(None if folder is None else folder / TALLY_FILE)
    known = config.sample_known_event()
    known_after = sample_known_epsilon(
        known,
        rounds=tally.worst_case_rounds(extra=1),
        delta=mechanism.delta,
        accountant=mechanism.accountant,
    )
    if known_after > mechanism.epsilon:
        known_cost = sample_known_epsilon(
            known, rounds=1, delta=mechanism.delta, accountant=mechanism.accountant
        )
        raise ConfigError(
            f"dp.server.epsilon={mechanism.epsilon:g} (against observers who know the sample) "
            f"cannot afford one round: one round costs epsilon {known_cost:.4g} to a site that "
            f"takes part (noise multiplier {config.noise_multiplier:.4g}); raise the budget or the "
            "noise"
        )
