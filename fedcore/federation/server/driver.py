"""The server's round loop over Flower's Grid, with a record of every round.

Flower's ``Strategy.start`` runs rounds but offers no hook between them, so fedcore drives the same
strategy methods itself (``configure_train``, ``aggregate_train``, ``configure_evaluate``,
``aggregate_evaluate``) and adds, per round:

- waiting for the expected sites with a deadline (Flower's sampler would wait forever);
- a deadline on every exchange (``round_timeout``): a site that does not answer in time, whose
  worker was killed, or that replies with an error, counts as failed and the round goes on;
- checking each reply before the strategy sees it (:mod:`fedcore.federation.messages`): a NaN,
  infinite or wrongly shaped update is dropped with its reason, never averaged in;
- central evaluation, bytes in each direction, timing, and one row of the run record (the
  serialized bytes of each exchange, or stage, in its operator-only fields: one send-and-receive
  is :mod:`fedcore.federation.server.exchange`).

If no site of a round replies usably, the model is left as it was and the round is a *failed
round* (``round_failed`` in its row); the run goes on, unless the last ``max_failed_rounds`` rounds
all failed: then it stops as failed, naming the reason seen most often.

Every aggregate is cast back to the global model's dtypes (:func:`~fedcore.federation.server.strategies.keep_dtypes`),
and usable replies are ordered by site id before the strategy sees them, so a round's aggregate does
not depend on the order in which replies arrived (a resumed run ends with the same model).

``run_rounds`` can start at any round (``first_round``) from a model and strategy restored from a
checkpoint, and calls ``checkpoint`` after the initial evaluation (round 0) and after every round.

How a round's training turns into one aggregate is a :class:`TrainRound`: :func:`plain_train_round`
sends the global model and lets the strategy average the replies; privacy layers (site-level DP at
the server, secure aggregation) supply their own. A ``TrainRound`` that raises
:class:`~fedcore.errors.BudgetExceededError` before sending anything stops the run cleanly: the
model of the last completed round is kept and the run record says why. One that raises a protocol
error (``ProtocolError``, ``InvalidMessage``) loses that round only: the model is kept, the row's
``failures["round"]`` says why, and the next round runs.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcore.errors import BudgetExceededError, InvalidMessage, ProtocolError
from fedcore.federation import messages as m
from fedcore.federation.server.exchange import (
    Exchange,
    Wire,
    exchange,
    wire_fields,
)
from fedcore.federation.server.strategies import keep_dtypes
from fedcore.runrecord import RecordWriter, RoundRow
from fedcore.training import EvalResult


class Reporter(Protocol):
    """Where progress goes (a rich display, plain log lines, or nothing)."""

    def started(self, *, rounds: int, initial: EvalResult, done: int = 0) -> None: ...
    def round_done(self, row: RoundRow, *, rounds: int) -> None: ...
    def waiting(self, *, connected: int, expected: int) -> None: ...


class NullReporter:
    def started(self, *, rounds: int, initial: EvalResult, done: int = 0) -> None:
        pass

    def round_done(self, row: RoundRow, *, rounds: int) -> None:
        pass

    def waiting(self, *, connected: int, expected: int) -> None:
        pass


def wait_for_sites(
    grid: Grid, *, expected: int, timeout: float, reporter: Reporter, poll: float = 0.5
) -> int:
    """Wait until ``expected`` nodes are connected or ``timeout`` passes; return how many are."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < expected and time.monotonic() < deadline:
        reporter.waiting(connected=connected, expected=expected)
        time.sleep(poll)
    return connected


def stop_when_all_declined(*, sent: int, declined: int) -> str:
    """Why the run should stop after this round ("" to go on): every sampled site declined."""
    if sent and declined == sent:
        return "every sampled site declined: their record-level privacy budgets are spent"
    return ""


@dataclass(frozen=True, slots=True)
class TrainOutcome:
    """What a round's training produced: the new global arrays (None: keep the old ones), the
    exchanges behind them, and extra fields for the round's history row."""

    aggregated: ArrayRecord | None
    sent: int
    replied: int
    declined: int
    failures: dict[str, str]
    bytes_down: int
    bytes_up: int
    train_loss: float
    num_examples: int
    site_epsilon: dict[int, float] = field(default_factory=dict)
    server_epsilon: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    stop: str = ""  # non-empty: record this round, then stop the run for this reason
    sites: Mapping[str, int] = field(default_factory=dict)  # node id -> site id, where reported
    wire: Mapping[str, Wire] = field(default_factory=dict)  # stage -> its serialized bytes

    @classmethod
    def from_exchange(
        cls, train: Exchange, aggregated: ArrayRecord | None, **fields: Any
    ) -> TrainOutcome:
        """The outcome of a round whose training was the single exchange ``train``."""
        return cls(
            aggregated=aggregated,
            sent=train.sent,
            replied=len(train.valid),
            declined=len(train.declined),
            failures=train.failures,
            bytes_down=train.bytes_down,
            bytes_up=train.bytes_up,
            train_loss=_weighted(train.valid, "train_loss"),
            num_examples=sum(int(m.metric(r, m.NUM_EXAMPLES)) for r in train.valid),
            site_epsilon=train.site_epsilon,
            stop=stop_when_all_declined(sent=train.sent, declined=len(train.declined)),
            sites=train.sites,
            wire={"train": train.wire},
            **fields,
        )


class TrainRound(Protocol):
    def __call__(
        self,
        grid: Grid,
        strategy: Strategy,
        *,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        timeout: float,
    ) -> TrainOutcome: ...


def plain_train_round(
    grid: Grid,
    strategy: Strategy,
    *,
    server_round: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    timeout: float,
) -> TrainOutcome:
    """Send the global model to the sampled sites; the strategy aggregates the checked replies."""
    train = exchange(
        grid,
        strategy.configure_train(server_round, arrays, config, grid),
        timeout=timeout,
        check=lambda reply: m.check_train_reply(reply, arrays),
    )
    aggregated, _ = (
        strategy.aggregate_train(server_round, train.valid) if train.valid else (None, None)
    )
    return TrainOutcome.from_exchange(train, aggregated)


def instruction_for(
    strategy: Strategy, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
) -> tuple[list[Message], RecordDict]:
    """The strategy's train messages (it samples, and server optimizers remember the current model)
    and their shared content, for a TrainRound that addresses the content itself."""
    template = list(strategy.configure_train(server_round, arrays, config, grid))
    content = template[0].content if template else RecordDict({m.ARRAYS: arrays, m.CONFIG: config})
    return template, content


def hand_to_strategy(
    strategy: Strategy, server_round: int, aggregate: ArrayRecord, *, weight: int, reply_to: Message
) -> ArrayRecord | None:
    """Give the strategy one already-aggregated model as if it were the only reply: FedAvg keeps
    it, a server optimizer takes its step from it. Only right for linearly aggregating strategies."""
    reply = Message(
        content=RecordDict(
            {m.ARRAYS: aggregate, m.METRICS: MetricRecord({m.NUM_EXAMPLES: weight})}
        ),
        reply_to=reply_to,
    )
    aggregated, _ = strategy.aggregate_train(server_round, [reply])
    return aggregated


@dataclass(frozen=True, slots=True)
class RunOutcome:
    arrays: ArrayRecord
    stopped: str = ""  # why the run stopped before its last round; empty if it completed
    failed: str = ""  # why the run failed (its last max_failed_rounds rounds all failed)


Checkpoint = Callable[[int, ArrayRecord, Strategy], None]


def is_failed_round(*, sent: int, replied: int, declined: int) -> bool:
    """A round in which every site asked to train failed (none replied usably, none declined)."""
    return replied == 0 and sent - declined > 0


def failure_reason(rows: list[RoundRow]) -> str:
    """The failure reason seen most often in ``rows`` (a site's node id left out)."""
    reasons = Counter(why for row in rows for why in row.failures.values())
    if not reasons:
        return "no site replied"
    reason, count = reasons.most_common(1)[0]
    return f"{reason} ({count} of {sum(reasons.values())} site failures)"


def _weighted(replies: list[Message], key: str) -> float:
    """The example-weighted mean of metric ``key`` over the replies that report it (NaN if none)."""
    reporting = [r for r in replies if key in m.metrics_of(r)]
    total = sum(m.metric(r, m.NUM_EXAMPLES) for r in reporting)
    if not reporting or total <= 0:
        return math.nan
    return sum(m.metric(r, key) * m.metric(r, m.NUM_EXAMPLES) for r in reporting) / total


def _aborted(exc: Exception) -> TrainOutcome:
    """The outcome of a round that a protocol error ended: nothing aggregated, the model kept."""
    return TrainOutcome(
        aggregated=None,
        sent=0,
        replied=0,
        declined=0,
        failures={"round": f"aborted, the model is kept: {exc}"},
        bytes_down=0,
        bytes_up=0,
        train_loss=math.nan,
        num_examples=0,
    )


def round_row(
    server_round: int,
    train: TrainOutcome,
    evaluation: Exchange,
    central: EvalResult,
    *,
    seconds: float,
) -> RoundRow:
    """The record's row for one round: what training, the sites' and the central evaluation gave."""
    return RoundRow(
        round=server_round,
        sites_sampled=train.sent,
        sites_replied=train.replied,
        sites_failed=train.sent - train.replied - train.declined,
        train_loss=train.train_loss,
        eval_loss=central.loss,
        eval_accuracy=central.accuracy,
        seconds=seconds,
        bytes_down=train.bytes_down + evaluation.bytes_down,
        bytes_up=train.bytes_up + evaluation.bytes_up,
        num_examples=train.num_examples,
        ended_at=time.time(),
        site_eval_loss=_weighted(evaluation.valid, "eval_loss"),
        site_eval_accuracy=_weighted(evaluation.valid, "eval_accuracy"),
        failures={
            **{f"{k} (evaluate)": v for k, v in evaluation.failures.items()},
            **train.failures,
        },
        sites_declined=train.declined,
        site_epsilon={str(k): v for k, v in sorted(train.site_epsilon.items())},
        server_epsilon=math.nan if train.server_epsilon is None else train.server_epsilon,
        extra={**train.extra, **wire_fields({**train.wire, "evaluate": evaluation.wire})},
        round_failed=is_failed_round(
            sent=train.sent, replied=train.replied, declined=train.declined
        ),
    )


def _initial(
    initial: ArrayRecord,
    *,
    first_round: int,
    central_eval: Callable[[ArrayRecord], EvalResult],
    record: RecordWriter,
) -> EvalResult:
    """Round 0: from ``first_round`` 1 the initial model is evaluated first; a resumed run
    (``first_round`` > 1) keeps the record's round 0."""
    if first_round == 1:
        first = central_eval(initial)
        record.set_initial(loss=first.loss, accuracy=first.accuracy)
        return first
    return EvalResult(loss=record.initial_loss, accuracy=record.initial_accuracy, num_examples=0)


def _ended(record: RecordWriter, *, max_failed: int) -> str:
    """Why the run fails after this round (its last ``max_failed`` rounds all failed), or ''."""
    recent = record.rows[-max_failed:]
    if len(recent) == max_failed and all(r.round_failed for r in recent):
        last = (
            "the last round failed"
            if max_failed == 1
            else f"the last {max_failed} rounds all failed"
        )
        return f"{last}: {failure_reason(recent)}"
    return ""


def _train(
    train_round: TrainRound, grid: Grid, strategy: Strategy, **round_args: Any
) -> TrainOutcome:
    """One round's training; a protocol error ends that round only (BudgetExceededError, which
    ends the run, passes through)."""
    try:
        return train_round(grid, strategy, **round_args)
    except (ProtocolError, InvalidMessage) as exc:
        return _aborted(exc)


def _evaluate(
    grid: Grid,
    strategy: Strategy,
    server_round: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    timeout: float,
) -> Exchange:
    """The sites' evaluation of the round's model, replies checked."""
    return exchange(
        grid,
        strategy.configure_evaluate(server_round, arrays, config, grid),
        timeout=timeout,
        check=m.check_evaluate_reply,
    )


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    *,
    initial: ArrayRecord,
    rounds: int,
    expected_sites: int,
    timeout: float,
    config: Callable[[int], ConfigRecord],
    central_eval: Callable[[ArrayRecord], EvalResult],
    record: RecordWriter,
    reporter: Reporter,
    train_round: TrainRound = plain_train_round,
    first_round: int = 1,
    max_failed_rounds: int = 3,
    checkpoint: Checkpoint | None = None,
) -> RunOutcome:
    """Run rounds ``first_round``..``rounds`` from ``initial`` (round 0 first: :func:`_initial`);
    each round's row goes to ``record`` as it ends, then ``checkpoint(round, arrays, strategy)``.
    Returns the final arrays, and why the run stopped early (``train_round`` raised
    :class:`BudgetExceededError`) or failed (its last ``max_failed_rounds`` rounds all failed)."""
    first = _initial(initial, first_round=first_round, central_eval=central_eval, record=record)
    if first_round == 1 and checkpoint is not None:  # round 0
        checkpoint(0, initial, strategy)
    reporter.started(rounds=rounds, initial=first, done=first_round - 1)
    arrays = initial
    for server_round in range(first_round, rounds + 1):
        start = time.perf_counter()
        wait_for_sites(grid, expected=expected_sites, timeout=timeout, reporter=reporter)
        round_config = config(server_round)
        try:
            train = _train(
                train_round,
                grid,
                strategy,
                server_round=server_round,
                arrays=arrays,
                config=round_config,
                timeout=timeout,
            )
        except BudgetExceededError as exc:
            return RunOutcome(arrays=arrays, stopped=f"round {server_round} not run: {exc}")
        if train.aggregated is not None:
            arrays = keep_dtypes(train.aggregated, arrays)
        evaluation = _evaluate(grid, strategy, server_round, arrays, round_config, timeout)
        central = central_eval(arrays)
        row = round_row(
            server_round, train, evaluation, central, seconds=time.perf_counter() - start
        )
        record.append(row)
        record.note_sites({**evaluation.sites, **train.sites})
        if checkpoint is not None:
            checkpoint(server_round, arrays, strategy)
        reporter.round_done(row, rounds=rounds)
        if failed := _ended(record, max_failed=max_failed_rounds):
            return RunOutcome(arrays=arrays, failed=failed)
        if train.stop:
            stopped = f"stopped after round {server_round}: {train.stop}"
            return RunOutcome(arrays=arrays, stopped=stopped)
    return RunOutcome(arrays=arrays)
