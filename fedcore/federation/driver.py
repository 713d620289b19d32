"""The server's round loop over Flower's Grid, with a record of every round.

Flower's ``Strategy.start`` runs rounds but offers no hook between them, so fedcore drives the same
strategy methods itself (``configure_train``, ``aggregate_train``, ``configure_evaluate``,
``aggregate_evaluate``) and adds, per round:

- waiting for the expected sites with a deadline (Flower's sampler would wait forever);
- a deadline on every exchange (``round_timeout``): a site that does not answer in time, whose
  worker was killed, or that replies with an error, counts as failed and the round goes on;
- checking each reply before the strategy sees it (:mod:`fedcore.federation.messages`): a NaN,
  infinite or wrongly shaped update is dropped with its reason, never averaged in;
- central evaluation, bytes in each direction, timing, and one row of the run record.

If no site of a round replies usably, the model is left as it was and the run goes on; the row
records why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcore.errors import FedcoreError
from fedcore.federation import messages as m
from fedcore.runrecord import RoundRow, RunRecord
from fedcore.training import EvalResult


class Reporter(Protocol):
    """Where progress goes (a rich display, plain log lines, or nothing)."""

    def started(self, *, rounds: int, initial: EvalResult) -> None: ...
    def round_done(self, row: RoundRow, *, rounds: int) -> None: ...
    def waiting(self, *, connected: int, expected: int) -> None: ...


class NullReporter:
    def started(self, *, rounds: int, initial: EvalResult) -> None:
        pass

    def round_done(self, row: RoundRow, *, rounds: int) -> None:
        pass

    def waiting(self, *, connected: int, expected: int) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Exchange:
    """What came back from one send-and-receive."""

    valid: list[Message]
    failures: dict[str, str]
    sent: int
    bytes_down: int
    bytes_up: int


def _exchange(
    grid: Grid, messages: Iterable[Message], *, timeout: float, check: Callable[[Message], None]
) -> Exchange:
    outgoing = list(messages)
    bytes_down = sum(m.content_bytes(msg) for msg in outgoing)
    replies = list(grid.send_and_receive(outgoing, timeout=timeout)) if outgoing else []
    valid: list[Message] = []
    failures: dict[str, str] = {}
    bytes_up = 0
    for reply in replies:
        node = str(reply.metadata.src_node_id)
        bytes_up += m.content_bytes(reply)
        if reply.has_error():
            failures[node] = f"error reply ({reply.error.code}): {reply.error.reason}"
            continue
        try:
            check(reply)
        except FedcoreError as exc:
            failures[node] = str(exc)
            continue
        valid.append(reply)
    answered = {str(r.metadata.src_node_id) for r in replies}
    for msg in outgoing:
        node = str(msg.metadata.dst_node_id)
        if node not in answered:
            failures[node] = f"no reply within {timeout:g} s"
    return Exchange(
        valid=valid, failures=failures, sent=len(outgoing), bytes_down=bytes_down, bytes_up=bytes_up
    )


def wait_for_sites(
    grid: Grid, *, expected: int, timeout: float, reporter: Reporter, poll: float = 0.5
) -> int:
    """Wait until ``expected`` nodes are connected or ``timeout`` passes; return how many are."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < expected and time.monotonic() < deadline:
        reporter.waiting(connected=connected, expected=expected)
        time.sleep(poll)
    return connected


def _weighted(replies: list[Message], key: str) -> float:
    total = sum(float(r.content[m.METRICS][m.NUM_EXAMPLES]) for r in replies)
    if not replies or total <= 0:
        return math.nan
    return (
        sum(
            float(r.content[m.METRICS][key]) * float(r.content[m.METRICS][m.NUM_EXAMPLES])
            for r in replies
        )
        / total
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
    record: RunRecord,
    reporter: Reporter,
) -> ArrayRecord:
    """Run ``rounds`` rounds of ``strategy`` from ``initial``; return the final global arrays.

    ``config(round)`` builds the train/evaluate config record of a round. Each round's row is
    appended to ``record`` as soon as the round ends.
    """
    first = central_eval(initial)
    record.set_initial(loss=first.loss, accuracy=first.accuracy)
    reporter.started(rounds=rounds, initial=first)
    arrays = initial
    for server_round in range(1, rounds + 1):
        start = time.perf_counter()
        wait_for_sites(grid, expected=expected_sites, timeout=timeout, reporter=reporter)
        reference = arrays
        train = _exchange(
            grid,
            strategy.configure_train(server_round, arrays, config(server_round), grid),
            timeout=timeout,
            check=lambda reply, ref=reference: m.check_train_reply(reply, ref),
        )
        aggregated, _ = (
            strategy.aggregate_train(server_round, train.valid) if train.valid else (None, None)
        )
        if aggregated is not None:
            arrays = aggregated
        evaluation = _exchange(
            grid,
            strategy.configure_evaluate(server_round, arrays, config(server_round), grid),
            timeout=timeout,
            check=m.check_evaluate_reply,
        )
        central = central_eval(arrays)
        row = RoundRow(
            round=server_round,
            sites_sampled=train.sent,
            sites_replied=len(train.valid),
            sites_failed=train.sent - len(train.valid),
            train_loss=_weighted(train.valid, "train_loss"),
            eval_loss=central.loss,
            eval_accuracy=central.accuracy,
            seconds=time.perf_counter() - start,
            bytes_down=train.bytes_down + evaluation.bytes_down,
            bytes_up=train.bytes_up + evaluation.bytes_up,
            num_examples=sum(int(r.content[m.METRICS][m.NUM_EXAMPLES]) for r in train.valid),
            ended_at=time.time(),
            site_eval_loss=_weighted(evaluation.valid, "eval_loss"),
            site_eval_accuracy=_weighted(evaluation.valid, "eval_accuracy"),
            failures={
                **{f"{k} (evaluate)": v for k, v in evaluation.failures.items()},
                **train.failures,
            },
        )
        record.append(row)
        reporter.round_done(row, rounds=rounds)
    return arrays
