"""Site-level DP at a trusted server: DP-FedAvg as a :class:`~fedcore.federation.driver.TrainRound`.

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

Assumptions: the server runs this code faithfully (trusted server); a site's update is its whole
contribution (each site counts once per round). A site that fails or sends a malformed update is
simply absent from the sum; the noise and the charge do not depend on who replied.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from fedcore.errors import ConfigError
from fedcore.federation import messages as m
from fedcore.federation.driver import TrainOutcome, exchange, hand_to_strategy, instruction_for
from fedcore.privacy import Budget, PrivacyLedger, Scope, ScopeKind, calibrate_noise_multiplier
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


def federation_ledger(settings: Settings, path) -> PrivacyLedger:  # noqa: ANN001 - a path
    dp = settings.dp.server
    if dp.epsilon is None:
        raise ConfigError("setting 'dp.server.epsilon' is unset: site-level DP is off")
    return PrivacyLedger.open(
        path,
        scope=Scope(ScopeKind.FEDERATION_SITES, "federation"),
        budget=Budget(epsilon=dp.epsilon, delta=dp.delta),
        accountant=settings.dp.accountant,
    )


def server_dp_config(settings: Settings) -> ServerDPConfig:
    """DP-FedAvg's configuration; the noise multiplier is calibrated over all rounds if unset."""
    dp = settings.dp.server
    rate = settings.fraction_train
    noise = dp.noise_multiplier
    if noise is None:
        assert dp.epsilon is not None  # the caller checked that server DP is on
        noise = calibrate_noise_multiplier(
            target_epsilon=dp.epsilon,
            delta=dp.delta,
            sample_rate=rate,
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


@dataclass(slots=True)
class DPFedAvgRound:
    """The training half of a DP-FedAvg round; keeps the (adaptive) clipping norm across rounds."""

    config: ServerDPConfig
    ledger: PrivacyLedger
    rng: CryptoRng
    clip_norm: float

    @classmethod
    def create(
        cls, settings: Settings, ledger: PrivacyLedger, rng: CryptoRng | None = None
    ) -> DPFedAvgRound:
        config = server_dp_config(settings)
        return cls(config=config, ledger=ledger, rng=rng or CryptoRng(), clip_norm=config.clip_norm)

    def release(
        self,
        clipped_sum: np.ndarray,
        *,
        contributors: int,
        unclipped: int | None,
        server_round: int,
    ) -> ServerRound:
        """Charge, noise and scale a sum of clipped updates that was formed elsewhere (under secure
        aggregation, by the sites and the protocol); the next round's clip norm is kept."""
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
        self.ledger.check(self.config.round_event())  # stop before the round, not after
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
            extra={"clip_norm": released.clip_norm},
        )
