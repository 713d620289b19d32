"""What the sites encode under secure aggregation, and what the server releases from the sum.

One object per case, so that :class:`~fedcore.federation.server.secagg_round.SecAggTrainRound`
never branches on the protections:

- :class:`WeightedMean`: no site-level DP. Sites encode ``weight x clip(update)`` and the weight
  (:mod:`fedcore.secagg.encoding`); the server decodes the exact weighted mean, after checking
  that honest sites could have produced it (:func:`check_plausible`).
- :class:`NoisedSum`: a site-level mechanism on the sum
  (:class:`~fedcore.mechanisms.central_on_secagg.CentralOnSecAgg`). Sites clip to the round's
  norm and encode with weight 1 (its site half); the server decodes the clipped sum and the
  mechanism's server half (:class:`~fedcore.federation.server.dp_round.DPFedAvgRound`) charges,
  noises and scales it.
- :class:`DistributedSum`: distributed DP (:mod:`fedcore.mechanisms.distributed`). Sites clip,
  rotate, round and add their noise share before masking; the server decodes the noised sum,
  divides by the survivors and charges the federation ledger; it adds nothing.

Each gives the session's encoding (bound into the session id, so a replayed request cannot change
it) before anything is sent, and a :class:`Release` after the unmask; a decoded sum that no honest
sites could produce raises :class:`~fedcore.errors.RemoteProtocolError` and nothing is released.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fedcore.errors import RemoteProtocolError
from fedcore.federation.server.dp_round import DPFedAvgRound
from fedcore.mechanisms import SiteLevelDP
from fedcore.mechanisms.central_on_secagg import (
    CentralOnSecAgg,
    SiteClipping,
    decode_clipped_sum,
    session_length,
)
from fedcore.mechanisms.distributed import DistributedDP, with_noisers
from fedcore.privacy import PrivacyLedger
from fedcore.secagg import EncodingConfig, SessionEncoding, decode_mean

if TYPE_CHECKING:
    from fedcore.privacy.distributed_plan import DistributedPlan
    from fedcore.protections import SecureAggregation


@dataclass(frozen=True, slots=True)
class Release:
    """What the strategy receives from a round's sum: the mean update and its weight, and the
    record's fields (``server_epsilon``, ``clip_norm``) when a mechanism released it."""

    mean: np.ndarray
    weight: int
    num_examples: int
    server_epsilon: float | None = None
    clip_norm: float | None = None
    extra: dict[str, float] | None = None  # the mechanism's own per-round fields

    @property
    def fields(self) -> dict[str, float]:
        """What the run record's round row gains from this release."""
        out: dict[str, float] = {} if self.clip_norm is None else {"clip_norm": self.clip_norm}
        out.update(self.extra or {})
        return out


@dataclass(frozen=True, slots=True)
class SumPlan:
    """A round's encoding: the ring encoding, what the session binds of it, the vector length,
    and under distributed DP the round's plan (:class:`~fedcore.privacy.distributed_plan.DistributedPlan`)."""

    encoding: EncodingConfig
    session: SessionEncoding
    length: int
    distributed: DistributedPlan | None = None


class SecAggSum(Protocol):
    """How a round's sum is encoded and released (one implementation per protection)."""

    def check_round(self) -> None: ...

    def sample(self, nodes: list[int], invited: tuple[int, ...]) -> tuple[int, ...]: ...

    @property
    def stops_on_too_few(self) -> bool: ...

    @property
    def holds_out(self) -> bool:
        """Whether group testing may hold sites out of a round to find who spoils the sums."""
        ...

    def plan(self, *, sites: int, dim: int) -> SumPlan: ...

    def release(
        self,
        total: np.ndarray,
        plan: SumPlan,
        *,
        survivors: list[int],
        server_round: int,
        session_id: bytes = b"",
    ) -> Release: ...

    def unreleased(self, *, server_round: int) -> Release | None:
        """What a round that released nothing (skipped, failed, discarded) still costs: the
        record's fields, or None when nothing is charged."""
        ...


@dataclass(slots=True)
class WeightedMean:
    """Secure aggregation without site-level DP: the exact weighted mean of the survivors."""

    bits: int
    clip_range: float

    def check_round(self) -> None:
        return None

    def sample(self, nodes: list[int], invited: tuple[int, ...]) -> tuple[int, ...]:
        """The strategy's own choice of sites."""
        return invited

    @property
    def stops_on_too_few(self) -> bool:
        """Too few sites for the protocol, with every site the strategy chose: the settings cannot
        work, so the run stops."""
        return True

    @property
    def holds_out(self) -> bool:
        return True

    def plan(self, *, sites: int, dim: int) -> SumPlan:
        encoding = EncodingConfig(
            bits=self.bits, clip=self.clip_range, max_total_weight=weight_budget(self.bits)
        )
        session = SessionEncoding(
            clip=encoding.clip,
            max_total_weight=encoding.max_total_weight,
            dp_clip_norm=0.0,
            count_unclipped=False,
        )
        return SumPlan(encoding=encoding, session=session, length=session_length(dim, None))

    def release(
        self,
        total: np.ndarray,
        plan: SumPlan,
        *,
        survivors: list[int],
        server_round: int,
        session_id: bytes = b"",
    ) -> Release:
        mean, total_weight = decode_mean(total, config=plan.encoding)
        check_plausible(mean, total_weight, sites=len(survivors), config=plan.encoding)
        return Release(mean=mean, weight=total_weight, num_examples=total_weight)

    def unreleased(self, *, server_round: int) -> Release | None:
        return None  # no privacy ledger: nothing to charge


@dataclass(slots=True)
class NoisedSum:
    """Secure aggregation under a site-level mechanism: the noised mean of the clipped updates."""

    mechanism: CentralOnSecAgg
    dp: DPFedAvgRound

    def check_round(self) -> None:
        self.dp.check_round()  # stop before the round, not after

    def sample(self, nodes: list[int], invited: tuple[int, ...]) -> tuple[int, ...]:
        """Poisson sampling from a CSPRNG (the amplification the ledger claims)."""
        from fedcore.privacy.dpfedavg import poisson_sample

        return tuple(poisson_sample(nodes, rate=self.dp.config.sampling_rate, rng=self.dp.rng))

    @property
    def stops_on_too_few(self) -> bool:
        return False

    @property
    def holds_out(self) -> bool:
        """No: a round with sites held out is skipped with other odds than the mechanism's skip
        charge assumes (:mod:`fedcore.privacy.skips` bounds a round drawn from every site), so
        under site-level DP an implausible sum is discarded and nobody is held out or named."""
        return False

    def _clipping(self) -> SiteClipping:
        return self.mechanism.clipping(self.dp.clip_norm)

    def plan(self, *, sites: int, dim: int) -> SumPlan:
        clipping = self._clipping()
        encoding = self.mechanism.encoding(clipping, sites=sites, dim=dim)
        session = SessionEncoding(
            clip=encoding.clip,
            max_total_weight=encoding.max_total_weight,
            dp_clip_norm=clipping.clip_norm,
            count_unclipped=clipping.count_unclipped,
        )
        return SumPlan(encoding=encoding, session=session, length=session_length(dim, clipping))

    def release(
        self,
        total: np.ndarray,
        plan: SumPlan,
        *,
        survivors: list[int],
        server_round: int,
        session_id: bytes = b"",
    ) -> Release:
        clipped = decode_clipped_sum(total, clipping=self._clipping(), config=plan.encoding)
        released = self.dp.release(
            clipped.total,
            contributors=clipped.contributors,
            unclipped=clipped.unclipped,
            server_round=server_round,
            participants=survivors,
        )
        # num_examples 0: sites weigh the same and do not send their counts
        return Release(
            mean=released.aggregate[0],
            weight=1,
            num_examples=0,
            server_epsilon=released.epsilon,
            clip_norm=released.clip_norm,
            extra=self.dp.round_fields(),
        )

    def unreleased(self, *, server_round: int) -> Release | None:
        """A round that released nothing is charged as if it had released: whether a round is
        released depends on who was sampled (too few sampled sites skip it, sampled sites drop),
        so charging only released rounds would publish epsilons that tell the sample. The skip
        itself is charged as the mechanism's reveal probability (:mod:`fedcore.privacy.skips`)."""
        epsilon = self.dp.charge_unreleased(server_round=server_round)
        return Release(
            mean=np.zeros(0),
            weight=0,
            num_examples=0,
            server_epsilon=epsilon,
            extra=self.dp.round_fields(),
        )


@dataclass(slots=True)
class DistributedSum:
    """Distributed DP: the sum arrives noised by the sites; the server decodes, divides by the
    survivors and charges the federation ledger (at the survivors' honest noisers)."""

    mechanism: DistributedDP
    ledger: PrivacyLedger
    last: DistributedPlan | None = None  # the previous round's plan

    def check_round(self) -> None:
        """Stop before a round the federation ledger cannot afford (BudgetExceededError); the
        first round was checked before the run (:meth:`DistributedDP.check_before_run`)."""
        if self.last is not None:
            self.ledger.check(self.last.round_event())

    def sample(self, nodes: list[int], invited: tuple[int, ...]) -> tuple[int, ...]:
        """The strategy's own choice: no amplification by sampling is claimed against the server."""
        return invited

    @property
    def stops_on_too_few(self) -> bool:
        return True

    @property
    def holds_out(self) -> bool:
        """No: group testing reads released sums, and these are noised (it would name honest
        sites); the plan's noise is also sized for the sites sampled."""
        return False

    def plan(self, *, sites: int, dim: int) -> SumPlan:
        """The round's plan bound into the session (ConfigError, before anything is sent, for a
        ring or a tolerance that cannot work)."""
        plan = self.last = self.mechanism.plan(sites=sites, dim=dim)
        session = SessionEncoding(
            clip=plan.clip_norm,
            max_total_weight=sites,
            dp_clip_norm=plan.clip_norm,
            distributed=self.mechanism.session(plan, sites=sites),
        )
        encoding = EncodingConfig(bits=plan.bits, clip=plan.clip_norm, max_total_weight=sites)
        return SumPlan(encoding=encoding, session=session, length=plan.padded_dim, distributed=plan)

    def release(
        self,
        total: np.ndarray,
        plan: SumPlan,
        *,
        survivors: list[int],
        server_round: int,
        session_id: bytes = b"",
    ) -> Release:
        """Decode the noised sum (:func:`~fedcore.mechanisms.distributed_encoding.decode_sum`),
        charge the round at ``len(survivors) - colluders`` noisers, and return the mean."""
        from fedcore.mechanisms.distributed import rotation_seed
        from fedcore.mechanisms.distributed_encoding import DistributedEncoding, decode_sum

        dplan, bound = plan.distributed, plan.session.distributed
        if dplan is None or bound is None:
            raise RemoteProtocolError("a distributed sum needs its round's plan")
        encoding = DistributedEncoding.from_plan(dplan)
        summed = decode_sum(total, encoding=encoding, rotation_seed=rotation_seed(session_id))
        event = with_noisers(dplan.round_event(), len(survivors) - bound.colluders)
        label = (
            f"distributed round (gamma {dplan.gamma:.6g}, {dplan.bits}-bit ring, clip norm "
            f"{dplan.clip_norm:g}, {len(survivors)} survivors, {bound.colluders} colluders)"
        )
        entry = self.ledger.charge(event, round_number=server_round, label=label)
        return Release(
            mean=summed / max(1, len(survivors)),
            weight=1,
            num_examples=0,
            server_epsilon=entry.epsilon_after,
            extra=self.mechanism.parameters(dplan),
        )

    def unreleased(self, *, server_round: int) -> Release | None:
        """Nothing is charged: no sum left the masks, and the sites charged their own ledgers
        for what they sent (their guarantee is theirs). The record shows the spend so far."""
        return Release(
            mean=np.zeros(0), weight=0, num_examples=0, server_epsilon=self.ledger.epsilon()
        )


def sums_for(
    secagg: SecureAggregation,
    mechanism: SiteLevelDP | None,
    dp: DPFedAvgRound | None,
    ledger: PrivacyLedger | None,
) -> SecAggSum:
    """The run's sum: distributed DP's, DP-FedAvg's on the sum (``dp``), or the exact mean."""
    if isinstance(mechanism, DistributedDP) and ledger is not None:
        return DistributedSum(mechanism=mechanism, ledger=ledger)
    if dp is not None:
        return NoisedSum(mechanism=mechanism, dp=dp)  # type: ignore[arg-type]
    return WeightedMean(bits=secagg.bits, clip_range=secagg.clip_range)


def check_plausible(
    mean: np.ndarray, total_weight: int, *, sites: int, config: EncodingConfig
) -> None:
    """Raise RemoteProtocolError unless the decoded mean could come from honest sites.

    Every site clips to ``[-clip, clip]`` and adds w x clip(x) x scale rounded stochastically (an
    error below 1 per site), so an honest weighted mean lies within ``clip + sites / (scale W)``
    of zero in every coordinate, and the total weight W is at least 1 (else there is no mean).
    """
    if total_weight < 1:
        raise RemoteProtocolError(f"total weight {total_weight}: no site contributed a weight")
    bound = config.clip + sites / (config.scale * total_weight)
    peak = float(np.max(np.abs(mean))) if mean.size else 0.0
    if not peak <= bound:  # also catches NaN
        raise RemoteProtocolError(
            f"a coordinate of the decoded mean is {peak / config.clip:.3g} times the clip range "
            f"{config.clip:g}: some site's input was not a valid encoding (a weight coordinate "
            "that cancels the others', or a value beyond the clip range); the sum cannot say whose"
        )


def weight_budget(bits: int) -> int:
    """A bound on a round's total weight (examples): 2**24, or less in a small ring."""
    return 1 << min(24, bits - 8)
