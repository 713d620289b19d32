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
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcore.config import Settings
from fedcore.crypto import CryptoRng
from fedcore.errors import BudgetExceededError, ConfigError
from fedcore.federation import messages as m
from fedcore.federation.server.driver import (
    Exchange,
    TrainOutcome,
    exchange,
    hand_to_strategy,
    instruction_for,
)
from fedcore.mechanisms import BudgetAgainst, Mechanism
from fedcore.privacy import PrivacyLedger
from fedcore.privacy.dpfedavg import (
    ServerDPConfig,
    ServerRound,
    dp_fedavg_round,
    poisson_sample,
    release_clipped_sum,
)
from fedcore.privacy.sample_known import TALLY_FILE, ParticipationTally, sample_known_epsilon
from fedcore.protections import protections_of


def check_before_run(settings: Settings, *, dim: int, record_dir: Path | None = None) -> None:
    """Refuse, before anything starts, a site-level DP run that cannot work
    (:meth:`fedcore.mechanisms.SiteLevelDP.check_before_run`); nothing when site-level DP is off.
    Raises :class:`ConfigError`."""
    mechanism = protections_of(settings).mechanism
    if mechanism is not None:
        mechanism.check_before_run(dim=dim, record_dir=record_dir)


@dataclass(slots=True)
class DPFedAvgRound:
    """The training half of a DP-FedAvg round; keeps the (adaptive) clipping norm across rounds."""

    config: ServerDPConfig
    ledger: PrivacyLedger
    rng: CryptoRng
    clip_norm: float
    tally: ParticipationTally
    budget_against: BudgetAgainst = BudgetAgainst.OBSERVERS
    sample_known_epsilon: float = 0.0  # after the last released round

    @classmethod
    def create(
        cls, mechanism: Mechanism, ledger: PrivacyLedger, rng: CryptoRng | None = None
    ) -> DPFedAvgRound:
        config = mechanism.server_config()
        folder = ledger.path.parent if ledger.path is not None else None
        tally = ParticipationTally.open(None if folder is None else folder / TALLY_FILE)
        made = cls(
            config=config,
            ledger=ledger,
            rng=rng or CryptoRng(),
            clip_norm=config.clip_norm,
            tally=tally,
            budget_against=mechanism.budget_against,
        )
        made.sample_known_epsilon = made._known(0)
        return made

    def _known(self, extra: int) -> float:
        """The sample-known epsilon of a site sampled in every released round (``extra`` more):
        the budget check and the public record use this worst case, which depends on no sample
        (stopping when the most-sampled site reached the budget would tell who was sampled)."""
        return sample_known_epsilon(
            self.config.sample_known_event(),
            rounds=self.tally.worst_case_rounds(extra=extra),
            delta=self.ledger.budget.delta,
            accountant=self.ledger.accountant,
        )

    def check_round(self) -> None:
        """Raise BudgetExceededError, before anything is sent, if the next round would pass the
        budget: the ledger's (observers who do not know the sample) always, and with
        ``budget_against = sample-known`` also the epsilon of a site that takes part once more."""
        self.ledger.check(self.config.round_event())
        if self.budget_against is BudgetAgainst.SAMPLE_KNOWN:
            after = self._known(1)
            if not after <= self.ledger.budget.epsilon:
                raise BudgetExceededError(
                    f"against observers who know the sample, a site taking part in one more round "
                    f"would reach epsilon {after:.6g} > budget {self.ledger.budget.epsilon:g} "
                    f"(now {self.sample_known_epsilon:.6g}); nothing was charged"
                )

    def round_fields(self) -> dict[str, float]:
        """The fields a released round adds to the run record. Public: the sample-known epsilon
        of a site sampled in every released round (zero-out, and replace-one), which depends on
        no sample; withheld to the operator (:mod:`fedcore.protections`, ``SITE_LEVEL_WITHHELD``):
        the realised one, the most-sampled site's, which grows with who was sampled."""
        from fedcore.privacy.relations import SiteRelation
        from fedcore.privacy.sample_known import sample_known_round_event

        z, delta, accountant = (
            self.config.noise_multiplier,
            self.ledger.budget.delta,
            self.ledger.accountant,
        )
        known = self.tally.epsilons(
            self.config.sample_known_event(), delta=delta, accountant=accountant
        )
        replace_one = sample_known_round_event(
            noise_multiplier=z, relation=SiteRelation.REPLACE_ONE
        )
        return {
            "server_epsilon_sample_known": known.worst_case,
            "server_epsilon_sample_known_replace_one": self.tally.epsilons(
                replace_one, delta=delta, accountant=accountant, relation=SiteRelation.REPLACE_ONE
            ).worst_case,
            "server_epsilon_sample_known_realised": known.realised,
        }

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

    def charge_unreleased(self, *, server_round: int) -> float:
        """Charge a round that released nothing as if it had (and count it in the sample-known
        worst case, with no participant): the published epsilons then depend on the schedule
        only. Returns the ledger's epsilon after."""
        entry = self.ledger.charge(
            self.config.round_event(), round_number=server_round, label="round, nothing released"
        )
        self._participated(())
        return entry.epsilon_after

    def _exchange(
        self,
        grid: Grid,
        strategy: Strategy,
        *,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        timeout: float,
    ) -> tuple[list[Message], RecordDict, Exchange]:
        """Send the strategy's instruction to the Poisson-sampled sites and collect their checked
        replies. The strategy builds its instruction (and, for server optimizers, remembers the
        current model); fedcore chooses who receives it."""
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
        return outgoing, content, train

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
        outgoing, content, train = self._exchange(
            grid, strategy, server_round=server_round, arrays=arrays, config=config, timeout=timeout
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
