"""The batched simulation engine over an in-memory Grid: a few Flower nodes, each playing many
sites through the real ClientApp, with one behaviour per site (issue 24).

``site_grid(settings, behaviours, per_node=k)`` gives, for ``k == 1``, the one-node-per-site
:class:`FakeGrid`; for ``k > 1`` a :class:`BatchedFakeGrid` of ``ceil(sites / k)`` nodes, with
``NODES_ENV`` set so that ``run_server`` wraps it in the real ``BatchedGrid``. The behaviours are
taken in order: the i-th is site i's; ``grid.site_ids`` names the node ids the server sees.
"""

from __future__ import annotations

import math

import pytest
from flwr.app import ConfigRecord, Context, Error, Message

from fedcore.config import Settings
from fedcore.federation.simulation import batched
from tests.federation.conftest import Behaviour, FakeGrid, honest


class BatchedFakeGrid(FakeGrid):
    """``nodes`` in-memory Flower nodes; node ``j`` plays sites ``j, j + nodes, ...`` in turn."""

    def __init__(self, settings: Settings, behaviours: dict[int, Behaviour], *, nodes: int):
        self.settings = settings
        self.site_behaviours = {
            batched.virtual_id(i): behaviour for i, behaviour in enumerate(behaviours.values())
        }
        self.site_ids = tuple(self.site_behaviours)
        self.replies: list[Message] = []  # every node's one reply, as it left the node
        super().__init__(settings, {7000 + 13 * j: self._node for j in range(nodes)})

    def _node(self, msg: Message, context: Context) -> Message:
        if all(b is honest for b in self.site_behaviours.values()):
            reply = honest(msg, context)  # the real ClientApp, batch and all
        else:
            reply = self._with_site_behaviours(msg, context)
        self.replies.append(reply)
        return reply

    def _with_site_behaviours(self, msg: Message, context: Context) -> Message:
        silent: set[int] = set()

        def site(one: Message, own: Context) -> Message:
            reply = self.site_behaviours[own.node_id](one, own)
            if reply is None:  # a silent site: left out of its node's reply
                silent.add(batched.site_of_virtual(own.node_id))
                return Message(Error(code=0, reason="silent"), reply_to=one)
            return reply

        reply = batched.answer_batch(msg, context, self.settings, site)
        if silent:
            sites = [s for s in reply.content[batched.BATCH][batched.SITES] if s not in silent]
            reply.content[batched.BATCH] = ConfigRecord({batched.SITES: sites})
        return reply


def site_grid(
    settings: Settings,
    behaviours: dict[int, Behaviour],
    *,
    per_node: int,
    monkeypatch: pytest.MonkeyPatch,
) -> FakeGrid:
    """One node per site (``per_node == 1``, ids as given) or the batched engine."""
    if per_node == 1:
        monkeypatch.delenv(batched.NODES_ENV, raising=False)
        grid = FakeGrid(settings, behaviours)
        grid.site_ids = tuple(behaviours)  # type: ignore[attr-defined]
        return grid
    nodes = math.ceil(len(behaviours) / per_node)
    monkeypatch.setenv(batched.NODES_ENV, str(nodes))
    monkeypatch.setenv(batched.WORKERS_ENV, "2")
    return BatchedFakeGrid(settings, behaviours, nodes=nodes)
