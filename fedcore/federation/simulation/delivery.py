"""Prompt delivery of messages in Flower's simulation engine (issue 13, the per-round floor).

Flower 1.41's simulation engine moves messages between the ServerApp's Grid and the Ray workers
with two polling loops: a thread that looks for new instructions every 0.1 s
(``vce_api.add_messages_to_queue``) and the Grid, which looks for replies every 0.1 s
(``InMemoryGrid.send_and_receive``). A round is two exchanges (train, evaluate), so with a few
nodes that each play many sites a round waited on average about 0.1 s for nothing: a third of a
100-site round here.

Neither interval is a parameter, and Flower's files stay as installed. Instead, for the duration
of fedcore's simulation (:func:`prompt_delivery`, entered by
:func:`fedcore.federation.simulation.engine.simulate`), the engine's two loop functions are Flower's
own, line for line, except that they are woken by events: :data:`PUSHED` when the ServerApp has
pushed instructions (set by :class:`PromptGrid`), :data:`REPLIED` when a reply is stored. Each
still wakes after :data:`FALLBACK` seconds without an event, Flower's own interval, so a message
no event announced is delivered as late as before, never later. What a loop does when it wakes
(scan every node for one instruction, store one reply) is unchanged.

The loops are looked up by name in ``flwr.server.superlink.fleet.vce.vce_api`` when the engine
starts, so the swap is scoped: :func:`prompt_delivery` puts Flower's own back on exit. flwr is
pinned to 1.41.0; if these functions ever change name, the swap is skipped and the engine polls as
Flower wrote it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from queue import Empty, Queue
from typing import Any

FALLBACK = 0.1  # seconds: Flower's own polling interval, kept as the longest wait

PUSHED = threading.Event()  # the ServerApp pushed instructions
REPLIED = threading.Event()  # a reply is in the link state

_active = False


def active() -> bool:
    """Whether the engine's loops are the prompt ones now (inside :func:`prompt_delivery`)."""
    return _active


def add_messages_to_queue(
    state: Any, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event
) -> None:
    """Flower's ``vce_api.add_messages_to_queue``, woken by :data:`PUSHED`."""
    while not f_stop.is_set():
        PUSHED.clear()  # before the scan: a push during it wakes the next wait at once
        for node_id in nodes_mapping.keys():
            message_ins_list = state.get_message_ins(node_id=node_id, limit=1)
            for msg in message_ins_list:
                queue.put(msg)
        PUSHED.wait(FALLBACK)


def put_message_into_state(state: Any, queue: Queue, f_stop: threading.Event) -> None:
    """Flower's ``vce_api.put_message_into_state``, announcing each reply (:data:`REPLIED`)."""
    while not f_stop.is_set():
        try:
            message_reply = queue.get(timeout=1.0)
        except Empty:
            continue
        state.store_message_res(message_reply)
        REPLIED.set()


@contextmanager
def prompt_delivery() -> Iterator[None]:
    """Inside, Flower's simulation engine started in this process uses the prompt loops."""
    global _active
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:  # pragma: no cover - flwr is a dependency
        yield
        return
    names = ("add_messages_to_queue", "put_message_into_state")
    if not all(callable(getattr(vce_api, name, None)) for name in names):  # pragma: no cover
        yield
        return
    saved = {name: getattr(vce_api, name) for name in names}
    vce_api.add_messages_to_queue = add_messages_to_queue
    vce_api.put_message_into_state = put_message_into_state
    _active = True
    try:
        yield
    finally:
        _active = False
        for name, function in saved.items():
            setattr(vce_api, name, function)


class PromptGrid:
    """Flower's in-memory Grid whose ``send_and_receive`` announces its instructions
    (:data:`PUSHED`) and waits for replies on :data:`REPLIED` rather than sleeping between polls.
    The loop is ``InMemoryGrid.send_and_receive``'s otherwise (same timeout semantics)."""

    def __init__(self, grid: Any) -> None:
        self.grid = grid

    def __getattr__(self, name: str) -> Any:  # get_node_ids, run, set_run, ... pass through
        return getattr(self.grid, name)

    def send_and_receive(
        self, messages: Iterable[Any], *, timeout: float | None = None
    ) -> list[Any]:
        msg_ids = set(self.grid.push_messages(messages))
        PUSHED.set()
        end_time = time.time() + (timeout if timeout is not None else 0.0)
        ret: list[Any] = []
        while timeout is None or time.time() < end_time:
            REPLIED.clear()  # before the pull: a reply stored during it wakes the wait at once
            res_msgs = list(self.grid.pull_messages(msg_ids))
            ret.extend(res_msgs)
            msg_ids.difference_update({msg.metadata.reply_to_message_id for msg in res_msgs})
            if not msg_ids:
                break
            wait = FALLBACK if timeout is None else min(FALLBACK, max(0.0, end_time - time.time()))
            REPLIED.wait(wait)
        return ret
