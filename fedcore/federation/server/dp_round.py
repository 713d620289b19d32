"""Site-level DP at a trusted server: DP-FedAvg as a :class:`~fedcore.federation.server.driver.TrainRound`.

Theory of operation (McMahan et al., "Learning Differentially Private Recurrent Language Models",
ICLR 2018; Andrew et al., NeurIPS 2021 for adaptive clipping). Each round:

1. Before anything is sent, the federation ledger checks that the round's event fits the budget;
   if not, :class:`~fedcore.errors.BudgetExceededError` stops the run cleanly, before the round.
2. Sites are sampled by Poisson sampling at rate ``q = fraction_train`` with a CSPRNG
   (:func:`fedcore.privacy.dpfedavg.poisson_sample`), so the ledger may claim Poisson amplification
   (Flower's strategies sample a fixed-size set with Python's ``random``, which would support
   neither the amplification nor a cryptographic claim).
3. Each sampled site trains as usual; its update (new weights minus global weights) is clipped to
   L2 norm ``C``, the clipped updates are summed, Gaussian noise of standard deviation ``z C`` is
   added from a CSPRNG, and the sum is divided by the expected number of sites ``q n``
   (:func:`fedcore.privacy.dpfedavg.dp_fedavg_round`, which charges the ledger before releasing).
4. The strategy receives the noisy global model as a single reply, so FedAvg keeps it as it is and
   the server optimizers (FedAdam) take their step from it: the privacy guarantee is untouched by
   any post-processing the strategy does.

Two epsilons, each named for its observer (issue 11, point 1). ``server_epsilon`` (the federation
ledger) holds against observers of the released models who do not know which sites were sampled,
with amplification by sampling. ``server_epsilon_sample_known`` holds against observers of the
released models who know which sites took part (the participants under secure aggregation, the
operator, a reader of ``operator.jsonl``): no amplification, composed over the rounds each site
actually took part in, maximum over sites (:mod:`fedcore.privacy.sample_known`).
``dp.server.budget_against`` says which of the two the budget binds (``observers`` by default; the
ledger's budget is always enforced). Neither holds against the server itself: it sees every update
(under secure aggregation, the exact sum) before the noise. Site-level DP at a trusted server gives
no guarantee against that server.

The federation ledger and the participation tally live in ``dp.server.state_dir`` (the run record
if unset) and compose across runs over the same federation.

Assumptions: the server runs this code faithfully (trusted server); a site's update is its whole
contribution (each site counts once per round). A site that fails or sends a malformed update is
simply absent from the sum; the noise and the charge do not depend on who replied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcore.config import Settings
from fedcore.crypto import CryptoRng
from fedcore.errors import BudgetExceededError, ConfigError
from fedcore.federation import messages as m
from fedcore.federation.server.driver import (
    TrainOutcome,
    exchange,
    hand_to_strategy,
    instruction_for,
)
from fedcore.mechanisms.central_on_secagg import check_dp_ring
from fedcore.privacy import (
    Budget,
    PrivacyLedger,
    Scope,
    ScopeKind,
    calibrate_noise_multiplier,
    epsilon,
)
from fedcore.privacy.dpfedavg import (
    Clipping,
    ServerDPConfig,
    ServerRound,
    SiteSampling,
    dp_fedavg_round,
    poisson_sample,
    release_clipped_sum,
)
from fedcore.privacy.ledger import FEDERATION_LEDGER_FILE as LEDGER_FILE
from fedcore.privacy.sample_known import TALLY_FILE, ParticipationTally, sample_known_epsilon


def federation_state_dir(settings: Settings, record_dir: Path) -> Path:
    """Where the federation ledger lives: ``dp.server.state_dir``, else the run record."""
    folder = Path(settings.dp.server.state_dir) if settings.dp.server.state_dir else record_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create dp.server.state_dir {str(folder)!r}: {exc}") from None
    return folder


def federation_ledger(settings: Settings, path) -> PrivacyLedger:  # noqa: ANN001 - a path
    """Open the federation ledger. ``path`` is the run record's ledger file; with
    ``dp.server.state_dir`` set the ledger lives there instead and composes across runs.

    Raises :class:`~fedcore.errors.LedgerLostError` for a ledger missing or older than its seal.
    """
    dp = settings.dp.server
    if dp.epsilon is None:
        raise ConfigError("setting 'dp.server.epsilon' is unset: site-level DP is off")
    folder = federation_state_dir(settings, Path(path).parent)
    return PrivacyLedger.open(
        folder / LEDGER_FILE,
        scope=Scope(ScopeKind.FEDERATION_SITES, "federation"),
        budget=Budget(epsilon=dp.epsilon, delta=dp.delta),
        accountant=settings.dp.accountant,
        # a participation tally means rounds were released here: a missing ledger is a lost one
        released=(folder / TALLY_FILE).exists(),
    )


def server_dp_config(settings: Settings) -> ServerDPConfig:
    """DP-FedAvg's configuration; the noise multiplier is calibrated over all rounds if unset.

    With ``dp.server.budget_against = sample-known`` the calibration assumes a site may take part
    in every round (sampling rate 1, no amplification), so the budget holds against observers who
    know the sample.
    """
    dp = settings.dp.server
    rate = settings.fraction_train
    noise = dp.noise_multiplier
    if noise is None:
        if dp.epsilon is None:
            raise ConfigError("setting 'dp.server.epsilon' is unset: site-level DP is off")
        noise = calibrate_noise_multiplier(
            target_epsilon=dp.epsilon,
            delta=dp.delta,
            sample_rate=1.0 if dp.budget_against == SAMPLE_KNOWN else rate,
            steps=settings.rounds,
            accountant=settings.dp.accountant,
        )
    return ServerDPConfig(
        total_sites=settings.sites,
        sites_per_round=rate * settings.sites,
        noise_multiplier=float(noise),
        clip_norm=dp.clip_norm,
        clipping=Clipping(dp.clipping),
        sampling=SiteSampling.POISSON,
    )


SAMPLE_KNOWN = "sample-known"


def check_before_run(settings: Settings, *, dim: int, record_dir: Path | None = None) -> None:
    """Refuse, before anything starts, a site-level DP run that cannot work (issue 11, points 4
    and 6): a secure-aggregation ring too small for the DP encoding, or a budget (what is left of
    it, with ``dp.server.state_dir``) that one round cannot afford; the message gives one round's
    cost. Reads the ledger without writing it. Raises :class:`ConfigError`.
    """
    dp = settings.dp.server
    if dp.epsilon is None:
        return
    if settings.secagg.enabled:
        check_dp_ring(bits=settings.secagg.bits, sites=settings.sites, dim=dim)
    config = server_dp_config(settings)
    folder = Path(dp.state_dir) if dp.state_dir else record_dir
    budget = Budget(epsilon=dp.epsilon, delta=dp.delta)
    scope = Scope(ScopeKind.FEDERATION_SITES, "federation")
    path = None if folder is None else folder / LEDGER_FILE
    if path is not None and path.exists():
        ledger = PrivacyLedger.load(path)
        ledger = PrivacyLedger(
            scope=scope, budget=budget, accountant=settings.dp.accountant, entries=ledger.entries
        )
    else:
        ledger = PrivacyLedger(scope=scope, budget=budget, accountant=settings.dp.accountant)
    event = config.round_event()
    cost = epsilon([event], delta=dp.delta, accountant=settings.dp.accountant)
    after = ledger.epsilon_if_charged(event)
    tally = ParticipationTally.open(None if folder is None else folder / TALLY_FILE)
    known_after = sample_known_epsilon(
        config.sample_known_event(),
        rounds=tally.max_rounds(extra=1),
        delta=dp.delta,
        accountant=settings.dp.accountant,
    )
    known_cost = sample_known_epsilon(
        config.sample_known_event(), rounds=1, delta=dp.delta, accountant=settings.dp.accountant
    )
    spent = ledger.epsilon()
    if after > dp.epsilon:
        raise ConfigError(
            f"dp.server.epsilon={dp.epsilon:g} cannot afford one round: one round costs epsilon "
            f"{cost:.4g} (noise multiplier {config.noise_multiplier:.4g}, sampling rate "
            f"{config.sampling_rate:g}){f', and {spent:.4g} is already spent' if spent else ''}; "
            "raise the budget or the noise multiplier"
        )
    if dp.budget_against == SAMPLE_KNOWN and known_after > dp.epsilon:
        raise ConfigError(
            f"dp.server.epsilon={dp.epsilon:g} (against observers who know the sample) cannot "
            f"afford one round: one round costs epsilon {known_cost:.4g} to a site that takes part "
            f"(noise multiplier {config.noise_multiplier:.4g}); raise the budget or the noise"
        )


@dataclass(slots=True)
class DPFedAvgRound:
    """The training half of a DP-FedAvg round; keeps the (adaptive) clipping norm across rounds."""

    config: ServerDPConfig
    ledger: PrivacyLedger
    rng: CryptoRng
    clip_norm: float
    tally: ParticipationTally
    budget_against: str = "observers"
    sample_known_epsilon: float = 0.0  # after the last released round

    @classmethod
    def create(
        cls, settings: Settings, ledger: PrivacyLedger, rng: CryptoRng | None = None
    ) -> DPFedAvgRound:
        config = server_dp_config(settings)
        folder = ledger.path.parent if ledger.path is not None else None
        tally = ParticipationTally.open(None if folder is None else folder / TALLY_FILE)
        made = cls(
            config=config,
            ledger=ledger,
            rng=rng or CryptoRng(),
            clip_norm=config.clip_norm,
            tally=tally,
            budget_against=settings.dp.server.budget_against,
        )
        made.sample_known_epsilon = made._known(0)
        return made

    def _known(self, extra: int) -> float:
        return sample_known_epsilon(
            self.config.sample_known_event(),
            rounds=self.tally.max_rounds(extra=extra),
            delta=self.ledger.budget.delta,
            accountant=self.ledger.accountant,
        )

    def check_round(self) -> None:
        """Raise BudgetExceededError, before anything is sent, if the next round would pass the
        budget: the ledger's (observers who do not know the sample) always, and with
        ``budget_against = sample-known`` also the epsilon of a site that takes part once more."""
        self.ledger.check(self.config.round_event())
        if self.budget_against == SAMPLE_KNOWN:
            after = self._known(1)
            if not after <= self.ledger.budget.epsilon:
                raise BudgetExceededError(
                    f"against observers who know the sample, a site taking part in one more round "
                    f"would reach epsilon {after:.6g} > budget {self.ledger.budget.epsilon:g} "
                    f"(now {self.sample_known_epsilon:.6g}); nothing was charged"
                )

    def round_fields(self) -> dict[str, float]:
        """The fields a released round adds to the run record."""
        return {"server_epsilon_sample_known": self.sample_known_epsilon}

    def _participated(self, participants: Sequence[object]) -> None:
        self.tally.record(participants)
        self.sample_known_epsilon = self._known(0)

    def release(
        self,
        clipped_sum: np.ndarray,
        *,
        contributors: int,
        unclipped: int | None,
        server_round: int,
        participants: Sequence[object] = (),
    ) -> ServerRound:
        """Charge, noise and scale a sum of clipped updates that was formed elsewhere (under secure
        aggregation, by the sites and the protocol); the next round's clip norm is kept, and the
        ``participants`` (node ids whose update is in the sum) are tallied for the sample-known
        epsilon."""
        released = release_clipped_sum(
            [clipped_sum],
            contributors=contributors,
            unclipped=unclipped,
            config=self.config,
            clip_norm=self.clip_norm,
            ledger=self.ledger,
            rng=self.rng,
            round_number=server_round,
            dtype=np.float64,
        )
        self.clip_norm = released.next_clip_norm
        self._participated(participants)
        return released

    def __call__(
        self,
        grid: Grid,
        strategy: Strategy,
        *,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        timeout: float,
    ) -> TrainOutcome:
        self.check_round()  # stop before the round, not after
        keys = list(arrays.keys())
        global_arrays = [arrays[k].numpy() for k in keys]
        if any(a.dtype.kind != "f" for a in global_arrays):
            raise ConfigError("site-level DP needs a model whose arrays are all floating point")
        # The strategy builds its instruction (and, for server optimizers, remembers the current
        # model); fedcore chooses who receives it.
        _, content = instruction_for(strategy, server_round, arrays, config, grid)
        sampled = poisson_sample(
            sorted(grid.get_node_ids()), rate=self.config.sampling_rate, rng=self.rng
        )
        outgoing = [
            Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)
            for node in sampled
        ]
        train = exchange(
            grid, outgoing, timeout=timeout, check=lambda reply: m.check_train_reply(reply, arrays)
        )
        updates = [
            [m.arrays_of(reply)[k].numpy() - g for k, g in zip(keys, global_arrays, strict=True)]
            for reply in train.valid
        ]
        released = dp_fedavg_round(
            updates,
            shapes=[g.shape for g in global_arrays],
            config=self.config,
            clip_norm=self.clip_norm,
            ledger=self.ledger,
            rng=self.rng,
            round_number=server_round,
            dtype=np.float32,
        )
        self.clip_norm = released.next_clip_norm
        self._participated([reply.metadata.src_node_id for reply in train.valid])
        noisy = ArrayRecord(
            {
                k: Array((g + a).astype(g.dtype))
                for k, g, a in zip(keys, global_arrays, released.aggregate, strict=True)
            }
        )
        reply_to = (
            outgoing[0]
            if outgoing
            else Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)
        )
        aggregated = hand_to_strategy(strategy, server_round, noisy, weight=1, reply_to=reply_to)
        return TrainOutcome.from_exchange(
            train,
            aggregated,
            server_epsilon=released.epsilon,
            extra={"clip_norm": released.clip_norm, **self.round_fields()},
        )
