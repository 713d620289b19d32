"""Many simulated sites per Flower node: one message per node per round, per-site results inside.

The design is written down at the top of :mod:`fedcore.federation.simulation.engine`. This module holds
both halves of the wire format:

- the server half, :class:`BatchedGrid`: a Grid that shows the strategy and the driver one
  *virtual node* per site (id ``site + 1``), packs the per-site messages addressed to the sites a
  Flower node plays into one message, and splits the node's one reply back into per-site replies
  (each looks as if the site's virtual node had answered on its own);
- the site half, :func:`answer_batch`: unpacks a batched request in the ClientApp, runs the
  ordinary per-site handler for each site in turn, and packs the per-site replies into one.

A batched request holds each distinct record once (the global model is sent once per node, not
once per site) under ``fedcore.batch.r<i>``, and a ConfigRecord ``fedcore.batch`` naming the sites
(``sites``) and, per site, which record goes under which key (``s<site>``: ``"key=ref"`` strings).
A batched reply holds, per answered site, its records under ``s<site>.<key>``, or its error under
``s<site>.error`` (``code``, ``reason``), and ``fedcore.batch`` listing the answered sites.

Secure aggregation (issue 24) rides the same format: each stage is one message per node, and each
site stays a party of its own. Its handler call gets a :class:`~flwr.app.Context` of its own
(its node id ``site + 1``, its partition) whose ``state`` is a fresh RecordDict holding only that
site's records, kept in the node's ``context.state`` under ``s<site>.<key>`` between messages
(:func:`answer_batch`); its key, journal and ledger are its own files (its ``SiteStore``), so no
object one site's handler call can reach holds another site's secrets.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from fedcore.config import Settings
from fedcore.data.federation import forget_sites
from fedcore.errors import RemoteProtocolError
from fedcore.federation import messages as m
from fedcore.federation.simulation import delivery
from fedcore.federation.site.data import NUM_PARTITIONS, PARTITION_ID
from fedcore.federation.site.folders import is_simulated

BATCH = "fedcore.batch"
SITES = "sites"
# The number of Flower nodes fedcore's simulation started (set by simulate() for the ServerApp,
# which runs in the same process); unset outside fedcore's simulation.
NODES_ENV = "FEDCORE_SIMULATED_NODES"
# How many of them Ray runs at once (set by simulate(); else :func:`workers` of the settings).
WORKERS_ENV = "FEDCORE_SIMULATED_WORKERS"

Handler = Callable[[Message, Context], Message]
# A node's request and reply are held whole (by its worker, Ray's object store and the server) while
# in flight: past this many sites a node, more nodes (a few more messages a round) keep them small.
MAX_AUTO_SITES_PER_NODE = 1000
PULL_INTERVAL = 0.01  # seconds between polls of the simulation's Grid for replies


# --------------------------------------------------------------------------------------------
# How many nodes
# --------------------------------------------------------------------------------------------


def workers(settings: Settings, cpus: int | None = None) -> int:
    """How many sites Ray runs at once here: CPUs over ``client_cpus`` (at least 1)."""
    total = max(cpus or os.cpu_count() or 1, int(settings.client_cpus))
    return max(1, int(total // settings.client_cpus))


def sites_per_node(settings: Settings, cpus: int | None = None) -> int:
    """The sites one simulated Flower node plays: ``simulation.sites_per_node``, or with 0 (auto)
    ``ceil(sites / workers)``, at most :data:`MAX_AUTO_SITES_PER_NODE`. Under secure aggregation
    too: each site a node plays keeps its own key, journal and state (:func:`answer_batch`)."""
    chosen = settings.simulation.sites_per_node
    if chosen == 0:
        chosen = min(math.ceil(settings.sites / workers(settings, cpus)), MAX_AUTO_SITES_PER_NODE)
    return max(1, min(chosen, settings.sites))


def node_count(settings: Settings, cpus: int | None = None) -> int:
    """How many Flower nodes the simulation starts for ``settings``."""
    return math.ceil(settings.sites / sites_per_node(settings, cpus))


def grid_for(grid: Any, settings: Settings) -> Any:
    """``grid`` itself, or a :class:`BatchedGrid` over it when fedcore's simulation started fewer
    nodes than sites (:data:`NODES_ENV`)."""
    raw = os.environ.get(NODES_ENV, "")
    if not raw:
        return grid
    if delivery.active() and hasattr(grid, "push_messages"):
        grid = delivery.PromptGrid(grid)  # woken by replies, not polling every 0.1 s
    elif isinstance(getattr(grid, "pull_interval", None), float):
        # Flower's in-memory Grid polls for replies every 0.1 s; a round of two exchanges over a
        # few nodes waits ~0.1 s for nothing. 10 ms costs the server thread little.
        grid.pull_interval = PULL_INTERVAL
    nodes = int(raw)
    parallel = int(os.environ.get(WORKERS_ENV) or workers(settings))
    if nodes >= settings.sites:
        return SimulatedGrid(grid, workers=parallel)
    return BatchedGrid(grid, sites=settings.sites, nodes=nodes, workers=parallel)


# --------------------------------------------------------------------------------------------
# Server half
# --------------------------------------------------------------------------------------------


def virtual_id(site: int) -> int:
    return site + 1


def site_of_virtual(node: int) -> int:
    return node - 1


class SimulatedGrid:
    """Flower's simulation Grid with one node per site, which says how many sites a stage queues
    on one of the ``workers`` (:meth:`sites_in_sequence`)."""

    def __init__(self, grid: Any, *, workers: int) -> None:
        self.grid = grid
        self.workers = max(1, workers)

    def __getattr__(self, name: str) -> Any:  # send_and_receive, get_node_ids, ... pass through
        return getattr(self.grid, name)

    def sites_in_sequence(self, destinations: Sequence[int]) -> int:
        """The most sites one worker answers one after another when ``destinations`` are sent."""
        return max(1, math.ceil(len(set(destinations)) / self.workers))


class BatchedGrid:
    """A Grid with one virtual node per site over a Grid with ``nodes`` Flower nodes.

    Site ``s`` is played by the ``s % nodes``-th of the Flower nodes in id order, for the whole
    run. Until all ``nodes`` have connected it shows no virtual nodes (the driver waits)."""

    def __init__(self, grid: Any, *, sites: int, nodes: int, workers: int = 1) -> None:
        self.grid = grid
        self.sites = sites
        self.nodes = nodes
        self.workers = max(1, workers)
        self._player: dict[int, int] = {}  # site -> Flower node id

    def __getattr__(self, name: str) -> Any:  # run, set_run, ... pass through
        return getattr(self.grid, name)

    def sites_in_sequence(self, destinations: Sequence[int]) -> int:
        """The most sites one worker answers one after another when the virtual nodes
        ``destinations`` are sent: a node plays its sites in turn, and past ``workers`` nodes
        the nodes queue too (the busiest nodes taken together)."""
        players = self._players()
        per_node: dict[int, int] = {}
        for node in set(destinations):
            player = players.get(site_of_virtual(node))
            per_node[player] = per_node.get(player, 0) + 1  # type: ignore[index]
        if not per_node:
            return 1
        loads = sorted(per_node.values(), reverse=True)
        rounds = math.ceil(len(loads) / self.workers)
        return sum(loads[:rounds])

    def _players(self) -> dict[int, int]:
        if not self._player:
            real = sorted(self.grid.get_node_ids())
            if len(real) >= self.nodes:
                real = real[: self.nodes]
                self._player = {s: real[s % self.nodes] for s in range(self.sites)}
        return self._player

    def get_node_ids(self) -> list[int]:
        return [virtual_id(s) for s in sorted(self._players())]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        outgoing = list(messages)
        players = self._players()
        by_node: dict[int, list[Message]] = {}
        for msg in outgoing:
            site = site_of_virtual(msg.metadata.dst_node_id)
            if site not in players:
                raise RemoteProtocolError(f"no simulated node plays virtual node {site + 1}")
            by_node.setdefault(players[site], []).append(msg)
        packed = [pack_request(self.grid, node, group) for node, group in by_node.items()]
        replies = self.grid.send_and_receive(packed, timeout=timeout) if packed else []
        virtual: list[Message] = []
        for reply in replies:
            group = by_node.get(reply.metadata.src_node_id, [])
            virtual += unpack_reply(reply, group)
        return virtual


def pack_request(grid: Any, node: int, group: Sequence[Message]) -> Message:
    """One message to Flower node ``node`` carrying the per-site messages ``group``."""
    refs: dict[int, str] = {}
    content = RecordDict()
    index = ConfigRecord({SITES: [site_of_virtual(msg.metadata.dst_node_id) for msg in group]})
    for msg in group:
        pairs = []
        for key, record in msg.content.items():
            if id(record) not in refs:
                refs[id(record)] = f"{BATCH}.r{len(refs)}"
                content[refs[id(record)]] = record
            pairs.append(f"{key}={refs[id(record)]}")
        index[f"s{site_of_virtual(msg.metadata.dst_node_id)}"] = pairs
    content[BATCH] = index
    return Message(content=content, dst_node_id=node, message_type=group[0].metadata.message_type)


def unpack_reply(reply: Message, group: Sequence[Message]) -> list[Message]:
    """Per-site replies (as from each site's virtual node) out of Flower node's one ``reply``."""
    if reply.has_error():
        return [Message(reply.error, reply_to=msg) for msg in group]
    answered = reply.content.get(BATCH)
    sites = set(answered.get(SITES, [])) if isinstance(answered, ConfigRecord) else set()  # type: ignore[arg-type]
    # One pass over the reply's records (s<site>.<key>), not one per site: a node's reply holds
    # the records of thousands of sites at 10,000.
    records: dict[str, dict[str, Any]] = {}
    for key, record in reply.content.items():
        head, dot, rest = key.partition(".")
        if dot and head.startswith("s"):
            records.setdefault(head, {})[rest] = record
    out = []
    for msg in group:
        site = site_of_virtual(msg.metadata.dst_node_id)
        if site not in sites:
            continue
        own = records.get(f"s{site}", {})
        error = own.get("error")
        if isinstance(error, ConfigRecord):
            out.append(
                Message(
                    Error(code=int(error["code"]), reason=str(error["reason"])),  # type: ignore[arg-type]
                    reply_to=msg,
                )
            )
            continue
        out.append(Message(content=RecordDict(own), reply_to=msg))
    return out


# --------------------------------------------------------------------------------------------
# Site half
# --------------------------------------------------------------------------------------------


def is_batch(msg: Message) -> bool:
    return not msg.has_error() and isinstance(msg.content.get(BATCH), ConfigRecord)


def site_context(
    context: Context, settings: Settings, site: int, state: RecordDict | None = None
) -> Context:
    """The context a site's own simulated node would have: its node id, its partition of the
    run's sites, and ``state``, a RecordDict of its own (a fresh empty one if None)."""
    return Context(
        run_id=context.run_id,
        node_id=virtual_id(site),
        node_config={PARTITION_ID: site, NUM_PARTITIONS: settings.sites},
        state=RecordDict() if state is None else state,
        run_config=context.run_config,
    )


def site_states(state: RecordDict) -> dict[int, dict[str, Any]]:
    """The per-site records a node keeps in its ``context.state`` (``s<site>.<key>``), by site,
    in one pass."""
    out: dict[int, dict[str, Any]] = {}
    for key, record in state.items():
        head, dot, rest = key.partition(".")
        if dot and head[:1] == "s" and head[1:].isdigit():
            out.setdefault(int(head[1:]), {})[rest] = record
    return out


def keep_site_state(state: RecordDict, site: int, before: Iterable[str], own: RecordDict) -> None:
    """Store site ``site``'s ``own`` state in the node's ``state``, replacing its keys ``before``."""
    for key in before:
        del state[f"s{site}.{key}"]
    for key, record in own.items():
        state[f"s{site}.{key}"] = record


def answer_batch(msg: Message, context: Context, settings: Settings, handler: Handler) -> Message:
    """Run ``handler`` (the ordinary per-site handler) for every site ``msg`` names, in turn, and
    pack the replies into one. Only in fedcore's simulation: a deployed site is one site and
    refuses to play others (:class:`RemoteProtocolError`)."""
    if not is_simulated(context.node_config):
        raise RemoteProtocolError("a batched (many-site) request reached a deployed site")
    index = msg.content[BATCH]
    if not isinstance(index, ConfigRecord):
        raise RemoteProtocolError(f"batched request's {BATCH!r} is not a config record")
    sites = [int(s) for s in index.get(SITES, [])]  # type: ignore[union-attr]
    if any(not 0 <= s < settings.sites for s in sites) or len(set(sites)) != len(sites):
        raise RemoteProtocolError(f"batched request names sites {sites} of {settings.sites}")
    content = RecordDict()
    states = site_states(context.state)
    with m.decoded_once():  # the global model, shared by the sites, is decoded once
        for site in sites:
            before = states.pop(site, {})
            own = RecordDict(dict(before))  # this site's state alone, in a record of its own
            _answer_site(msg, site_context(context, settings, site, own), handler, index, content)
            keep_site_state(context.state, site, before, own)
    content[BATCH] = ConfigRecord({SITES: sites})
    return Message(content=content, reply_to=msg)


def _answer_site(
    msg: Message, context: Context, handler: Handler, index: ConfigRecord, content: RecordDict
) -> None:
    """Run ``handler`` for the site whose own ``context`` is given, on its part of the batched
    request ``msg``; put its reply into ``content``."""
    site = site_of_virtual(context.node_id)
    pairs = [str(p).partition("=") for p in index.get(f"s{site}", [])]  # type: ignore[union-attr]
    if any(ref not in msg.content for _, _, ref in pairs):
        raise RemoteProtocolError(f"batched request for site {site} names a missing record")
    # The site's message is the node's own (its metadata shared, read only), with the site's
    # records: Flower's constructor for a message with given metadata.
    one = Message(  # type: ignore[call-overload]
        content=RecordDict({key: msg.content[ref] for key, _, ref in pairs}),
        metadata=msg.metadata,
    )
    try:
        reply = handler(one, context)
    finally:
        forget_sites()  # a site's data is held while it trains, not for the whole run
    if reply.has_error():
        content[f"s{site}.error"] = ConfigRecord(
            {"code": int(reply.error.code), "reason": str(reply.error.reason)}
        )
    else:
        for key, record in reply.content.items():
            content[f"s{site}.{key}"] = record


def dispatch(msg: Message, context: Context, handler: Handler) -> Message:
    """``handler`` for one site, or for every site of a batched request (a simulated node playing
    many sites; the run's settings read only then)."""
    if not is_batch(msg):
        return handler(msg, context)
    from fedcore.config import from_run_config

    return answer_batch(msg, context, from_run_config(context.run_config), handler)
