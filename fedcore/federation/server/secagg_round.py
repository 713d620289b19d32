"""Secure aggregation as a :class:`~fedcore.federation.server.driver.TrainRound`: the server learns only
the weighted sum of the sampled sites' updates.

Theory of operation. One training round runs the stages of :class:`fedcore.secagg.SecAggServer`
(Bonawitz et al., CCS 2017; Bell et al., CCS 2020) as consecutive exchanges over Flower's Grid,
each a ``train`` message carrying a ``secagg`` record (stage name and wire payload) and each with
its own deadline (``secagg.timeout`` per site; in simulation times the sites a worker answers in
turn, :mod:`fedcore.federation.simulation.deadlines`; Flower's own default is to wait forever):

    [enrol] -> advertise keys -> share keys -> masked input (the sites train here)
            -> [consistency] -> unmask

(the bracketed stages in ``secagg.mode = active`` only: enrol asks sites without an entry in the
registry of signing keys to publish theirs, consistency collects signatures on the survivor set).

A site that does not answer a stage in time, answers with an error, or sends something the
protocol refuses, is a dropout from that stage on; the server machine recovers it while at least
``t`` sites remain, and below ``t`` the round ends without an aggregate (the model is kept, the
run goes on, nothing is revealed). The stages run in the order the server machine gives
(``SecAggServer.stage``; a sparse graph adds the reveal stage that draws its ring).

One bad site costs at most its own contribution, never the run. A site whose sealed shares did not
open somewhere is left out of the sum (``failures`` names it and who reported it); a site that
revealed a share that does not fit is named while the secret is rebuilt from the others. Any
protocol error that still ends the round (too few sites, too many wrong shares, a reveal missing)
ends only the round: ``failures["round"]`` says why, the model is kept, the next round runs. The
decoded sum is checked before the strategy sees it: a total weight outside
``1..max_total_weight`` (a wrapped weight coordinate) or a mean outside the clip range by more
than the rounding margin (``|mean_i| <= clip + n / (scale x W)``: each site's stochastic rounding
moves its scaled term by less than 1) is impossible for honest sites, so the round is discarded
with that reason; the sum alone cannot say which site sent the bad input, so later rounds find it
by group testing (:mod:`fedcore.federation.server.suspects`), name it and leave it out. Sites encode ``weight x update`` and the weight itself
(:mod:`fedcore.secagg.encoding`), so the exact weighted mean comes out of the sum. The strategy
receives that mean as a single reply; this is only correct for strategies that aggregate
linearly (FedAvg and the server optimizers built on it), so any other is refused.

Secrets never travel: the messages carry public keys, encrypted shares, masked vectors and, at
the end, shares of the secrets of sites the protocol allows to be revealed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

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
from fedcore.errors import (
    ConfigError,
    FedcoreError,
    InvalidMessage,
    ProtocolError,
    RemoteProtocolError,
)
from fedcore.federation import messages as m
from fedcore.federation.server.driver import (
    Exchange,
    TrainOutcome,
    Wire,
    exchange,
    hand_to_strategy,
    instruction_for,
    stop_when_all_declined,
)
from fedcore.federation.server.secagg_sums import (
    Release,
    SecAggSum,
    SumPlan,
    check_plausible,
    weight_budget,
)
from fedcore.federation.server.strategies import check_linear
from fedcore.federation.server.suspects import GroupTesting
from fedcore.federation.simulation.deadlines import check_stage_timeouts, stage_deadline
from fedcore.federation.site import registry as secagg_registry
from fedcore.federation.site.secagg import ENROL, SECAGG, request_record
from fedcore.protections import SecureAggregation
from fedcore.secagg import (
    AggregateResult,
    SecAggServer,
    SessionConfig,
    TooFewSurvivors,
    default_threshold,
    encode,
)
from fedcore.secagg.config import Mode, Stage

__all__ = ["SecAggTrainRound", "check_linear", "check_plausible", "weight_budget"]


@dataclass(frozen=True, slots=True)
class _Round:
    """What a round has decided before its stages run: the sites, the threshold and the graph."""

    nodes: tuple[int, ...]
    threshold: int
    neighbors: int
    registry: dict[int, bytes] | None


@dataclass(slots=True)
class SecAggTrainRound:
    """The training half of a round under secure aggregation.

    ``sums`` says what the sites encode and what the server releases
    (:mod:`fedcore.federation.server.secagg_sums`): the exact weighted mean, or a site-level
    mechanism's noised sum (then the federation ledger is checked before anything is sent, sites
    are Poisson-sampled from a CSPRNG, each clips before masking, the noise goes on the sum).
    """

    settings: Settings  # the registry's folder (active mode)
    secagg: SecureAggregation
    sums: SecAggSum
    # who made earlier sums implausible (group testing): one site cannot veto every round
    suspects: GroupTesting = field(default_factory=GroupTesting)

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
        check_linear(strategy)
        self.sums.check_round()  # stop before the round, not after
        template, content = instruction_for(strategy, server_round, arrays, config, grid)
        invited = tuple(sorted({msg.metadata.dst_node_id for msg in template}))
        population = sorted(grid.get_node_ids())
        sampled = self.sums.sample(population, invited)
        nodes = self._admit(population, sampled)
        stats = _Stats()
        plan_round = self._plan(grid, nodes, stats)
        if plan_round is None:
            return self._outcome(_Round(nodes, 0, 0, None), stats, server_round=server_round)
        dim = sum(int(np.prod(arrays[k].shape)) for k in arrays.keys())
        plan = self.sums.plan(sites=len(plan_round.nodes), dim=dim)  # refuses before sending
        check_stage_timeouts(
            self.secagg.timeout,
            length=plan.length,
            peers=plan_round.neighbors or len(plan_round.nodes) - 1,
            bits=self.secagg.bits,
        )  # a round that can only time out is refused before it starts
        server = SecAggServer(self._session(plan_round, plan), registry=plan_round.registry)
        result = self._run_stages(grid, server, content=content, stats=stats)
        if result is None:
            return self._outcome(plan_round, stats, server_round=server_round)
        return self._finish(
            strategy, server_round, arrays, content, plan_round, plan, result, stats,
            session_id=server.session_id,
        )  # fmt: skip

    def _admit(self, population: list[int], sampled: tuple[int, ...]) -> tuple[int, ...]:
        """The sampled sites less those group testing holds out (never under site-level DP:
        holding sites out changes the skip odds the mechanism charges)."""
        if not self.sums.holds_out:
            return sampled
        return self.suspects.admit(population, sampled, runs=self.secagg.runs_at)

    def _finish(
        self,
        strategy: Strategy,
        server_round: int,
        arrays: ArrayRecord,
        content: RecordDict,
        plan_round: _Round,
        plan: SumPlan,
        result: AggregateResult,
        stats: _Stats,
        *,
        session_id: bytes,
    ) -> TrainOutcome:
        """Release the unmasked sum (or discard it as implausible, which group testing learns
        from) and hand the mean to the strategy."""
        survivors = sorted(result.survivors)
        try:
            release = self.sums.release(
                result.total,
                plan,
                survivors=survivors,
                server_round=server_round,
                session_id=session_id,
            )
        except (ProtocolError, InvalidMessage) as exc:  # nothing released (charged all the same)
            stats.failures["round"] = f"decoded sum discarded, the model is kept: {exc}"
            if self.sums.holds_out:
                stats.failures.update(
                    self.suspects.learn(released=False, server_round=server_round)
                )
            return self._outcome(plan_round, stats, server_round=server_round, survivors=survivors)
        if self.sums.holds_out:
            self.suspects.learn(released=True, server_round=server_round)
        reply_to = Message(
            content=content, dst_node_id=plan_round.nodes[0], message_type=MessageType.TRAIN
        )
        aggregated = hand_to_strategy(
            strategy,
            server_round,
            self._plus_mean(arrays, release.mean),
            weight=release.weight,
            reply_to=reply_to,
        )
        return self._outcome(
            plan_round,
            stats,
            server_round=server_round,
            aggregated=aggregated,
            survivors=survivors,
            release=release,
        )

    def _plan(self, grid: Grid, nodes: tuple[int, ...], stats: _Stats) -> _Round | None:
        """Enrol (active mode), then the threshold and the graph for the sites that remain; None
        (the reason in ``stats``) when too few remain for the protocol. Raises ConfigError when the
        settings themselves cannot work (the strategy's own choice of sites is too small)."""
        sampled = len(nodes)
        registry = None
        if self.secagg.mode is Mode.ACTIVE:
            registry = self._enrol(grid, nodes, stats)
            nodes = tuple(n for n in nodes if n in registry)
        neighbors = self.secagg.neighbors_for(len(nodes))
        threshold = self.secagg.threshold or (
            default_threshold(len(nodes), neighbors=neighbors, mode=self.secagg.mode)
            if len(nodes) >= 2
            else 2
        )
        if len(nodes) >= 2 and threshold <= len(nodes):
            return _Round(nodes, threshold, neighbors, registry)
        why = (
            f"secure aggregation needs at least max(2, threshold={threshold}) sites, "
            f"got {len(nodes)} of {sampled} sampled"
        )
        if self.sums.stops_on_too_few and len(nodes) == sampled:
            raise ConfigError(why)
        # Poisson sampling drew too few, or sites failed to enrol: skip the round; nothing is
        # released, and under site-level DP the round is charged all the same (with the skip's
        # own cost in the mechanism's event: fedcore.privacy.skips).
        stats.failures["round"] = f"{why}; nothing released"
        return None

    def _session(self, plan_round: _Round, plan: SumPlan) -> SessionConfig:
        return SessionConfig(
            round_id=os.urandom(16),
            clients=plan_round.nodes,
            threshold=plan_round.threshold,
            length=plan.length,
            bits=self.secagg.bits,
            neighbors=plan_round.neighbors,
            mode=self.secagg.mode,
            encoding=plan.session,  # every parameter that changes what a site sends
        )

    def _run_stages(
        self,
        grid: Grid,
        server: SecAggServer,
        *,
        content: RecordDict,
        stats: _Stats,
    ) -> AggregateResult | None:
        """Each protocol stage, in the order the server machine gives, as one exchange with its
        deadline; the unmasked sum, or None when the round ended without one (the reason in
        ``stats.failures["round"]``; no protocol error leaves this method)."""
        requests = server.start()
        try:
            while (stage := server.stage) is not None:
                started = time.perf_counter()
                outgoing = [
                    self._message(node, stage.value, encode(req), content)
                    for node, req in requests.items()
                ]
                replies = exchange(
                    grid,
                    outgoing,
                    timeout=self._deadline(grid, requests),
                    check=_check_secagg_reply,
                )
                stats.add(stage.value, replies)
                for reply in replies.valid:
                    node = reply.metadata.src_node_id
                    stats.bytes_by_site[str(node)] = stats.bytes_by_site.get(
                        str(node), 0
                    ) + m.content_bytes(reply)
                    try:
                        server.receive_bytes(node, _payload(reply))
                    except FedcoreError as exc:
                        if server.error is not None:
                            raise
                        stats.failures[str(node)] = f"{stage.value}: {exc}"
                if stage is Stage.MASKED_INPUT:
                    _blame_unopened(server, stats)
                if stage is Stage.UNMASK:
                    try:
                        result = server.finish(no_answer=server.pending)
                    finally:
                        for node, why in server.culprits.items():
                            stats.failures[str(node)] = f"unmask: {why} (share left out)"
                    stats.stage_seconds[stage.value] = time.perf_counter() - started
                    return result
                requests = server.advance(no_answer=server.pending)
                stats.stage_seconds[stage.value] = time.perf_counter() - started
        except TooFewSurvivors as exc:
            stats.failures["round"] = f"secure aggregation aborted, nothing revealed: {exc}"
        except (ProtocolError, InvalidMessage) as exc:
            stats.failures["round"] = f"secure aggregation aborted, no aggregate: {exc}"
        return None

    def _enrol(self, grid: Grid, nodes: tuple[int, ...], stats: _Stats) -> dict[int, bytes]:
        """ACTIVE mode: the registry of site signing keys, after asking the sampled sites that have
        no entry yet to publish theirs (they write it; the server only reads the folder). A site
        still without an entry is a failure of this round."""
        folder = secagg_registry.server_registry_dir(self.settings)
        registry = secagg_registry.load_registry(folder, ca=secagg_registry.folder_ca(folder))
        missing = [n for n in nodes if n not in registry]
        if missing:
            started = time.perf_counter()
            outgoing = [self._message(n, ENROL, ENROL.encode(), RecordDict()) for n in missing]
            deadline = self._deadline(grid, missing)
            stats.add(ENROL, exchange(grid, outgoing, timeout=deadline, check=_check_secagg_reply))
            registry = secagg_registry.load_registry(folder, ca=secagg_registry.folder_ca(folder))
            stats.stage_seconds[ENROL] = time.perf_counter() - started
        for node in nodes:
            if node not in registry:
                stats.failures.setdefault(str(node), "enrol: no signing key in the registry")
        return registry

    def _outcome(
        self,
        plan_round: _Round,
        stats: _Stats,
        *,
        server_round: int,
        aggregated: ArrayRecord | None = None,
        survivors: Sequence[int] = (),
        release: Release | None = None,
    ) -> TrainOutcome:
        if release is None:  # nothing released: charged all the same under site-level DP
            release = self.sums.unreleased(server_round=server_round)
        extra: dict[str, object] = {
            "secagg": {
                "clients": len(plan_round.nodes),
                "threshold": plan_round.threshold,
                "neighbors": plan_round.neighbors,
                "bits": self.secagg.bits,
                "mode": self.secagg.mode_name,
                "survivors": list(survivors),
                "bytes_up_by_site": dict(stats.bytes_by_site),  # this round only
                "stage_seconds": dict(stats.stage_seconds),
            }
        }
        if release is not None:
            extra.update(release.fields)
        nodes = plan_round.nodes
        return TrainOutcome(
            aggregated=aggregated,
            sent=len(nodes),
            replied=len(survivors),
            declined=len(stats.declined),
            failures=stats.failures,
            bytes_down=stats.bytes_down,
            bytes_up=stats.bytes_up,
            # per-site losses are not sent in the clear under secure aggregation
            train_loss=float("nan"),
            num_examples=0 if release is None else release.num_examples,
            site_epsilon=stats.site_epsilon,
            server_epsilon=None if release is None else release.server_epsilon,
            stop=stop_when_all_declined(sent=len(nodes), declined=len(stats.declined)),
            extra=extra,
            wire=stats.wire,
        )

    def _deadline(self, grid: Grid, nodes: Iterable[int]) -> float:
        """The stage's deadline: ``secagg.timeout`` per site a simulated worker answers in turn."""
        return stage_deadline(self.secagg.timeout, grid, list(nodes))

    def _message(self, node: int, stage: str, payload: bytes, content: RecordDict) -> Message:
        record = RecordDict({SECAGG: request_record(stage=stage, payload=payload)})
        if (
            stage == Stage.MASKED_INPUT.value
        ):  # the sites train now: they need the model and the config
            record[m.ARRAYS] = content.array_records[m.ARRAYS]
            record[m.CONFIG] = content.config_records[m.CONFIG]
        return Message(content=record, dst_node_id=node, message_type=MessageType.TRAIN)

    @staticmethod
    def _plus_mean(arrays: ArrayRecord, mean: np.ndarray) -> ArrayRecord:
        """``arrays`` plus the flat ``mean`` update (laid out in ``arrays``' key order)."""
        new: dict[str, Array] = {}
        offset = 0
        for key in arrays.keys():
            old = arrays[key].numpy()
            step = mean[offset : offset + old.size].reshape(old.shape)
            new[key] = Array((old.astype(np.float64) + step).astype(old.dtype))
            offset += old.size
        return ArrayRecord(new)


def _blame_unopened(server: SecAggServer, stats: _Stats) -> None:
    """Name, for the record, each site whose sealed shares did not open at some neighbours (it is
    left out of the sum); the server cannot tell a sender of garbage from a receiver that lies,
    so the reporters are named too."""
    for node, reporters in sorted(server.unopened.items()):
        stats.failures.setdefault(
            str(node),
            f"share: its sealed shares did not open at sites {sorted(reporters)[:8]}; "
            "left out of this round's sum",
        )


def _payload(reply: Message) -> bytes:
    """The wire payload of a stage reply; RemoteProtocolError if there is none."""
    record = reply.content.config_records.get(SECAGG)
    payload = None if record is None else record.get("payload")
    if not isinstance(payload, bytes):
        raise RemoteProtocolError(f"a secagg reply needs a {SECAGG!r} record with a bytes payload")
    return payload


def _check_secagg_reply(reply: Message) -> None:
    _payload(reply)


@dataclass(slots=True)
class _Stats:
    failures: dict[str, str] = field(default_factory=dict)
    declined: dict[str, str] = field(default_factory=dict)
    site_epsilon: dict[int, float] = field(default_factory=dict)
    bytes_by_site: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    wire: dict[str, Wire] = field(default_factory=dict)  # stage -> its serialized bytes

    def add(self, stage: str, replies: Exchange) -> None:
        self.wire[stage] = replies.wire
        self.bytes_down += replies.bytes_down
        self.bytes_up += replies.bytes_up
        self.site_epsilon.update(replies.site_epsilon)
        self.declined.update(replies.declined)
        for node, why in replies.failures.items():
            self.failures.setdefault(node, f"{stage}: {why}")
