"""Secure aggregation as a :class:`~fedcore.federation.driver.TrainRound`: the server learns only
the weighted sum of the sampled sites' updates.

Theory of operation. One training round runs the stages of :class:`fedcore.secagg.SecAggServer`
(Bonawitz et al., CCS 2017; Bell et al., CCS 2020) as consecutive exchanges over Flower's Grid,
each a ``train`` message carrying a ``secagg`` record (stage name and wire payload) and each with
its own deadline (``secagg.timeout``; Flower's own default is to wait forever):

    advertise keys -> share keys -> masked input (the sites train here) -> unmask

A site that does not answer a stage in time, answers with an error, or sends something the
protocol refuses, is a dropout from that stage on; the server machine recovers it while at least
``t`` sites remain, and below ``t`` the round ends without an aggregate (the model is kept, the
run goes on, nothing is revealed). Sites encode ``weight x update`` and the weight itself
(:mod:`fedcore.secagg.encoding`), so the exact weighted mean comes out of the sum. The strategy
receives that mean as a single reply; this is only correct for strategies that aggregate
linearly (FedAvg and the server optimizers built on it), so any other is refused.

Secrets never travel: the messages carry public keys, encrypted shares, masked vectors and, at
the end, shares of the secrets of sites the protocol allows to be revealed.
"""

from __future__ import annotations

import os
import time
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
from flwr.serverapp.strategy import FedAvg, Strategy

from fedcore.config import Settings
from fedcore.errors import ConfigError, FedcoreError, RemoteProtocolError
from fedcore.federation import messages as m
from fedcore.federation.driver import (
    Exchange,
    TrainOutcome,
    exchange,
    hand_to_strategy,
    instruction_for,
    stop_when_all_declined,
)
from fedcore.federation.secagg_site import SECAGG, request_record
from fedcore.secagg import (
    EncodingConfig,
    SecAggServer,
    SessionConfig,
    TooFewSurvivors,
    decode_mean,
    default_threshold,
    encode,
)
from fedcore.secagg.config import Mode

# Strategies whose aggregate is a (weighted) mean of the replies, possibly followed by a server
# optimizer step: FedAvg and its subclasses (FedAvgM, FedProx, FedOpt: FedAdam, FedYogi, FedAdagrad).
# FedMedian, FedTrimmedAvg, Krum, MultiKrum and Bulyan need the individual updates.
_NONLINEAR = (
    "FedMedian",
    "FedTrimmedAvg",
    "Krum",
    "MultiKrum",
    "Bulyan",
    "QFedAvg",
    "FedXgbBagging",
    "FedXgbCyclic",
)


def check_linear(strategy: Strategy) -> None:
    """Raise ConfigError unless ``strategy`` aggregates linearly (a weighted mean of the replies)."""
    name = type(strategy).__name__
    if not isinstance(strategy, FedAvg) or any(
        c.__name__ in _NONLINEAR for c in type(strategy).__mro__
    ):
        raise ConfigError(
            f"strategy {name} needs every site's individual update, which secure aggregation hides; "
            "use a linear strategy (fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad)"
        )


def neighbors_of(settings: Settings, sites: int) -> int:
    """0 for the complete graph, else the even k of the SecAgg+ Harary graph (complete if k >= n-1)."""
    if settings.secagg.neighbors == "complete":
        return 0
    k = int(settings.secagg.neighbors)
    return 0 if k >= sites - 1 else k


@dataclass(slots=True)
class SecAggTrainRound:
    """The training half of a round under secure aggregation."""

    settings: Settings

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
        template, content = instruction_for(strategy, server_round, arrays, config, grid)
        nodes = tuple(sorted({msg.metadata.dst_node_id for msg in template}))
        length = sum(int(np.prod(arrays[k].shape)) for k in arrays.keys()) + 1
        neighbors = neighbors_of(self.settings, len(nodes))
        threshold = self.settings.secagg.threshold or default_threshold(
            len(nodes), neighbors=neighbors
        )
        if len(nodes) < 2 or threshold > len(nodes):
            raise ConfigError(
                f"secure aggregation needs at least max(2, threshold={threshold}) sampled sites, got {len(nodes)}"
            )
        session = SessionConfig(
            round_id=os.urandom(16),
            clients=nodes,
            threshold=threshold,
            length=length,
            bits=self.settings.secagg.bits,
            neighbors=neighbors,
            mode=Mode.SEMI_HONEST,
        )
        encoding = EncodingConfig(
            bits=session.bits,
            clip=self.settings.secagg.clip_range,
            max_total_weight=_weight_budget(session.bits),
        )
        server = SecAggServer(session)
        stats = _Stats()
        requests = server.start()
        result = None
        try:
            for stage in ("advertise", "share", "masked_input", "unmask"):
                started = time.perf_counter()
                outgoing = [
                    self._message(
                        node,
                        stage,
                        encode(req),
                        content,
                        encoding if stage == "masked_input" else None,
                    )
                    for node, req in requests.items()
                ]
                replies = exchange(
                    grid, outgoing, timeout=self.settings.secagg.timeout, check=_check_secagg_reply
                )
                stats.add(stage, replies)
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
                        stats.failures[str(node)] = f"{stage}: {exc}"
                if stage == "unmask":
                    result = server.finish(no_answer=server.pending)
                else:
                    requests = server.advance(no_answer=server.pending)
                stats.stage_seconds[stage] = time.perf_counter() - started
        except TooFewSurvivors as exc:
            stats.failures["round"] = f"secure aggregation aborted, nothing revealed: {exc}"
        aggregated = None
        survivors: list[int] = []
        if result is not None:
            survivors = sorted(result.survivors)
            mean, total_weight = decode_mean(result.total, config=encoding)
            aggregated = hand_to_strategy(
                strategy,
                server_round,
                self._plus_mean(arrays, mean),
                weight=total_weight,
                reply_to=template[0],
            )
        return TrainOutcome(
            aggregated=aggregated,
            sent=len(nodes),
            replied=len(survivors),
            declined=len(stats.declined),
            failures=stats.failures,
            bytes_down=stats.bytes_down,
            bytes_up=stats.bytes_up,
            train_loss=float(
                "nan"
            ),  # per-site losses are not sent in the clear under secure aggregation
            num_examples=int(total_weight) if result is not None else 0,
            site_epsilon=stats.site_epsilon,
            stop=stop_when_all_declined(sent=len(nodes), declined=len(stats.declined)),
            extra={
                "secagg": {
                    "clients": len(nodes),
                    "threshold": threshold,
                    "neighbors": neighbors,
                    "bits": session.bits,
                    "survivors": survivors,
                    "bytes_up_by_site": dict(stats.bytes_by_site),  # this round only
                    "stage_seconds": dict(stats.stage_seconds),
                }
            },
        )

    def _message(
        self,
        node: int,
        stage: str,
        payload: bytes,
        content: RecordDict,
        encoding: EncodingConfig | None,
    ) -> Message:
        record = RecordDict(
            {SECAGG: request_record(stage=stage, payload=payload, encoding=encoding)}
        )
        if stage == "masked_input":  # the sites train now: they need the model and the config
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


def _weight_budget(bits: int) -> int:
    """A bound on a round's total weight (examples): 2**24, or less in a small ring."""
    return 1 << min(24, bits - 8)


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

    def add(self, stage: str, replies: Exchange) -> None:
        self.bytes_down += replies.bytes_down
        self.bytes_up += replies.bytes_up
        self.site_epsilon.update(replies.site_epsilon)
        self.declined.update(replies.declined)
        for node, why in replies.failures.items():
            self.failures.setdefault(node, f"{stage}: {why}")
