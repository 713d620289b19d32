"""One send-and-receive over Flower's Grid, and what it cost on the wire.

:func:`exchange` sends a batch of messages, waits for the replies up to a deadline, and sorts what
came back into usable replies, declines (a site whose budget would be passed) and failures with
their reasons (an error reply, a reply that fails its check, no reply in time). Every round of
:mod:`fedcore.federation.server.driver`, and each stage of a secure-aggregation round, is one.

Bytes are counted two ways:

- ``bytes_down``/``bytes_up``: the payloads' own size (:func:`fedcore.federation.messages.content_bytes`:
  array data, keys, scalars), as the run record has always reported them;
- ``wire``: per node, the size of the message as Flower serializes it for the SuperLink and the
  SuperNode (:func:`wire_bytes`: every object of the message's object tree, deflated: the
  protobuf bodies with their headers, the metadata included). What a site's link carries on top
  (TLS records, HTTP/2 and gRPC framing, polls, heartbeats, object ids asked for and confirmed) is
  not in it; the hosts test measures that ratio through a token-bucket queue
  (tests/deploy/test_hosts.py).

:func:`wire_fields` turns a round's per-stage ``wire`` into the two operator-only fields of its
row, ``bytes_by_stage`` and ``wire_by_site`` (:data:`fedcore.runrecord.OPERATOR_ONLY`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedcore.errors import FedcoreError
from fedcore.federation import messages as m

Wire = dict[str, tuple[int, int]]  # node id -> (serialized bytes sent to it, received from it)


def wire_bytes(message: Message) -> int:
    """The serialized size of ``message``: the deflated bytes of every object in its tree (the
    message, its records, arrays and array chunks), as Flower pushes and pulls them. An object
    that appears twice in the tree is counted once, as Flower sends it once."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


@dataclass(frozen=True, slots=True)
class Exchange:
    """What came back from one send-and-receive: usable replies, declines (a site's budget would
    be passed), failures with their reasons, and the epsilons sites reported."""

    valid: list[Message]
    declined: dict[str, str]
    failures: dict[str, str]
    site_epsilon: dict[int, float]
    sent: int
    bytes_down: int
    bytes_up: int
    sites: dict[str, int] = field(default_factory=dict)  # node id -> the site id it reported
    wire: Wire = field(default_factory=dict)


def exchange(
    grid: Grid, messages: Iterable[Message], *, timeout: float, check: Callable[[Message], None]
) -> Exchange:
    outgoing = list(messages)
    bytes_down = sum(m.content_bytes(msg) for msg in outgoing)
    sent_wire: dict[str, int] = {}
    for msg in outgoing:
        node = str(msg.metadata.dst_node_id)
        sent_wire[node] = sent_wire.get(node, 0) + wire_bytes(msg)
    replies = list(grid.send_and_receive(outgoing, timeout=timeout)) if outgoing else []
    valid: list[Message] = []
    declined: dict[str, str] = {}
    failures: dict[str, str] = {}
    reported: dict[int, float] = {}
    sites: dict[str, int] = {}
    received_wire: dict[str, int] = {}
    bytes_up = 0
    # A reply names the request it answers; an error reply the SuperLink writes for a node that
    # went away comes from the SuperLink's own node id, so the request's destination is the node.
    addressed = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in outgoing}
    addressed.pop("", None)  # ids the Grid did not set (a wrapping Grid's own messages)
    for reply in replies:
        src = addressed.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        node = str(src)
        bytes_up += m.content_bytes(reply)
        received_wire[node] = received_wire.get(node, 0) + wire_bytes(reply)
        if (site := _site_of(reply)) is not None:
            sites[node] = site
        if reply.has_error():
            failures[node] = f"error reply ({reply.error.code}): {reply.error.reason}"
            continue
        if (site_eps := m.site_epsilon(reply)) is not None:
            reported[site_eps[0]] = site_eps[1]
        if (reason := m.declined_reason(reply)) is not None:
            declined[node] = reason
            continue
        try:
            check(reply)
        except FedcoreError as exc:
            failures[node] = str(exc)
            continue
        valid.append(reply)
    valid.sort(key=_site_order)
    for node in sent_wire.keys() - received_wire.keys():
        failures[node] = f"no reply within {timeout:g} s"
    return Exchange(
        valid=valid,
        declined=declined,
        failures=failures,
        site_epsilon=reported,
        sent=len(outgoing),
        bytes_down=bytes_down,
        bytes_up=bytes_up,
        sites=sites,
        wire={
            node: (sent_wire.get(node, 0), received_wire.get(node, 0))
            for node in sorted(sent_wire.keys() | received_wire.keys(), key=int)
        },
    )


def wire_fields(by_stage: Mapping[str, Wire]) -> dict[str, dict[str, dict[str, int]]]:
    """A round's serialized bytes, from each stage's :attr:`Exchange.wire`: ``bytes_by_stage``
    (stage -> bytes sent to the sites and received from them, summed over the sites) and
    ``wire_by_site`` (node id -> the same, summed over the stages)."""
    stages: dict[str, dict[str, int]] = {}
    by_site: dict[str, dict[str, int]] = {}
    for stage, wire in by_stage.items():
        stages[stage] = {
            "sent": sum(down for down, _ in wire.values()),
            "received": sum(up for _, up in wire.values()),
            "messages": len(wire),
        }
        for node, (down, up) in wire.items():
            site = by_site.setdefault(node, {"sent": 0, "received": 0})
            site["sent"] += down
            site["received"] += up
    return {"bytes_by_stage": stages, "wire_by_site": by_site}


def _site_of(reply: Message) -> int | None:
    """The site id a reply reports (None if it names none)."""
    if reply.has_error():
        return None
    metrics = m.record_of(reply.content, m.METRICS, MetricRecord)
    site = metrics.get(m.SITE_ID) if metrics is not None else None
    return int(site) if isinstance(site, int | float) and not isinstance(site, bool) else None


def _site_order(reply: Message) -> tuple[float, int]:
    """Replies in site-id order (node id where a reply names no site): node ids are drawn anew in
    every run, site ids are not."""
    site = _site_of(reply)
    return (math.inf if site is None else float(site), reply.metadata.src_node_id)
