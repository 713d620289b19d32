"""Secure aggregation on the batched simulation engine (issue 24): a node plays many sites, one
message per node per stage, and each site stays a party of its own.

The server side is the real ServerApp code (``run_server``) over the real ``BatchedGrid``; the node
side is the real ClientApp (``tests/federation/batched_sites.py``). The attacks: a node's reply
that carries anything but its sites' own answers, a site's handler reaching another site's state
or key, a simulated stage failed by the simulator's own queueing, a round that can only time out.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message

import clients.app as client_app
from fedcore.config import resolve
from fedcore.crypto import CryptoRng
from fedcore.crypto.agreement import derive_rng
from fedcore.errors import ConfigError
from fedcore.federation.server.serve import run_server
from fedcore.federation.simulation import batched, deadlines
from fedcore.federation.site import secagg as secagg_site
from fedcore.federation.site.journal import RoundJournal
from fedcore.federation.site.store import SiteStore
from fedcore.secagg import SecAggClient, SecAggServer, decode_server_message, encode
from fedcore.secagg.config import Stage
from fedcore.secagg.messages import AdvertiseRequest, decode_client_message
from tests.federation.batched_sites import BatchedFakeGrid, site_grid
from tests.federation.conftest import FakeGrid, honest

BASE = [
    "dataset=synthetic",
    "synthetic.samples=1200",
    "local_epochs=1",
    "rounds=1",
    "secagg.enabled=true",
    "secagg.timeout=30",
    "seed=5",
]


def _per_site(msg: Message, key: str) -> dict[int, ConfigRecord]:
    """Site -> its ``key`` record in the batched request or reply ``msg``."""
    index = msg.content[batched.BATCH]
    out = {}
    for site in index[batched.SITES]:
        if f"s{site}" in index:  # a request: the site's records by reference
            refs = dict(str(p).split("=", 1) for p in index[f"s{site}"])
            if key in refs:
                out[site] = msg.content[refs[key]]
        elif f"s{site}.{key}" in msg.content:  # a reply: the site's records under its prefix
            out[site] = msg.content[f"s{site}.{key}"]
    return out


class RecordingGrid(BatchedFakeGrid):
    """The batched engine that keeps every node's request next to its reply."""

    def __init__(self, *args, **kwargs):
        self.exchanged: list[tuple[Message, Message]] = []
        super().__init__(*args, **kwargs)

    def _node(self, msg, context):
        reply = super()._node(msg, context)
        self.exchanged.append((msg, reply))
        return reply


def _seeded_rounding(monkeypatch):
    """Each site's stochastic rounding seeded by its update (tests only: a site draws it from the
    CSPRNG), so both engines encode the same update into the same ring vector; the encoded
    vectors are kept."""
    encoded: list[np.ndarray] = []
    real = secagg_site.encode_update

    def seeded(update, *, weight, config, rng):
        seed = hashlib.sha256(update.tobytes() + weight.to_bytes(8, "big")).digest()
        vector = real(update, weight=weight, config=config, rng=CryptoRng.from_seed(seed))
        encoded.append(vector.copy())
        return vector

    monkeypatch.setattr(secagg_site, "encode_update", seeded)
    return encoded


def _unmasked_totals(monkeypatch):
    totals: list[np.ndarray] = []
    real = SecAggServer.finish

    def finish(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        totals.append(result.total.copy())
        return result

    monkeypatch.setattr(SecAggServer, "finish", finish)
    return totals


def test_forty_sites_on_four_nodes_unmask_the_same_sum_as_one_node_per_site(tmp_path, monkeypatch):
    encoded = _seeded_rounding(monkeypatch)
    totals = _unmasked_totals(monkeypatch)
    sums, models = {}, {}
    for name, per_node in (("one", 1), ("batched", 10)):
        out = tmp_path / name
        settings = resolve(overrides=[*BASE, "sites=40", "secagg.neighbors=8", f"out={out}"])
        behaviours = {1000 + i: honest for i in range(40)}
        grid = site_grid(settings, behaviours, per_node=per_node, monkeypatch=monkeypatch)
        before = len(encoded)
        run_server(grid, settings, out)
        row = json.loads((out / "history.jsonl").read_text().splitlines()[0])
        assert row["sites_replied"] == 40 and len(row["secagg"]["survivors"]) == 40
        assert row["secagg"]["neighbors"] == 8
        ring = np.sum(np.stack(encoded[before:]), axis=0, dtype=np.uint32)  # wraps mod 2^32
        assert np.array_equal(totals[-1], ring), "the unmasked sum is the exact ring sum"
        sums[name], models[name] = totals[-1], torch.load(out / "model.pt")
        if per_node > 1:  # one message per node per stage: 4 nodes, never a message per site
            assert len(grid.contexts) == 4 and len(grid.replies) == 4 * grid.exchanges
    assert np.array_equal(sums["one"], sums["batched"])
    for key in models["one"]:
        assert torch.equal(models["one"][key], models["batched"][key])


def test_a_nodes_reply_carries_exactly_its_sites_own_answers(tmp_path, monkeypatch):
    """Each site's part of a node's reply names that site as sender and nobody else, and its
    advert is byte for byte what the site alone derives from its own key and journal nonce."""
    out = tmp_path / "run"
    settings = resolve(overrides=[*BASE, "sites=6", f"out={out}"])
    behaviours = {i: honest for i in range(6)}
    monkeypatch.setenv(batched.NODES_ENV, "2")
    grid = RecordingGrid(settings, behaviours, nodes=2)
    run_server(grid, settings, out)
    stages = 0
    for request, reply in grid.exchanged:
        asked = _per_site(request, secagg_site.SECAGG)
        answered = _per_site(reply, secagg_site.SECAGG)
        if not asked:
            continue  # the evaluation
        stages += 1
        assert set(answered) == set(asked) == set(reply.content[batched.BATCH][batched.SITES])
        for site, record in answered.items():
            assert decode_client_message(record["payload"]).sender == batched.virtual_id(site)
            server_message = decode_server_message(asked[site]["payload"])
            if isinstance(server_message, AdvertiseRequest):
                assert record["payload"] == _advert_alone(out, site, server_message)
    assert stages == 2 * 4  # two nodes, four stages


def _advert_alone(out, site: int, request: AdvertiseRequest) -> bytes:
    """The advert site ``site`` sends for ``request``, derived from its own files only."""
    key, journal = RoundJournal.open_site(SiteStore(out / "sites", site))
    round_id = request.config.round_id
    nonce = journal.entry(round_id).nonce
    rng = derive_rng(key, context=b"secagg|" + round_id + b"|" + nonce)
    return encode(SecAggClient(batched.virtual_id(site), rng=rng).receive(request))


def test_one_sites_state_and_key_are_out_of_reach_of_anothers_handler(tmp_path, monkeypatch):
    """Every handler call a node makes for a site sees a context of its own: its node id, a state
    record holding only its own transcript, and nothing that reaches another site's key."""
    out = tmp_path / "run"
    settings = resolve(overrides=[*BASE, "sites=4", f"out={out}"])
    calls: list[tuple[int, Context, list[str]]] = []
    real = client_app.train_one

    def watching(msg, context):
        calls.append((context.node_id, context, sorted(context.state.keys())))
        return real(msg, context)

    monkeypatch.setattr(client_app, "train_one", watching)
    grid = site_grid(settings, {i: honest for i in range(4)}, per_node=2, monkeypatch=monkeypatch)
    run_server(grid, settings, out)
    assert len({node for node, _, _ in calls}) == 4
    assert len({id(context.state) for _, context, _ in calls}) == len(calls), "a fresh record"
    for node, context, keys in calls:
        assert keys in ([], [secagg_site.SECAGG])
        record = context.state.config_records.get(secagg_site.SECAGG)
        if record is not None:  # its own round's transcript: requests addressed to it alone
            for payload in record["payloads"]:
                assert decode_server_message(payload).recipient == node
    keys = {s: RoundJournal.open_site(SiteStore(out / "sites", s))[0] for s in range(4)}
    assert len(set(keys.values())) == 4
    for node, context, _ in calls:
        reachable = _bytes_reachable_from(context)
        for site, key in keys.items():
            if batched.virtual_id(site) != node:
                assert not any(key in blob for blob in reachable), "another site's key"
    for node_context in grid.contexts.values():  # the node keeps each site's state apart
        for key in node_context.state.keys():
            assert key.split(".", 1)[1] == secagg_site.SECAGG and key.startswith("s")


def _bytes_reachable_from(root: object, limit: int = 200_000) -> list[bytes]:
    """Every bytes object reachable from ``root`` through the garbage collector's references,
    modules and classes left out (they reach the whole process)."""
    import types

    seen, stack, found = set(), [root], []
    while stack and len(seen) < limit:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, types.ModuleType | type):
            continue
        seen.add(id(obj))
        if isinstance(obj, bytes | bytearray):
            found.append(bytes(obj))
            continue
        stack.extend(gc.get_referents(obj))
    return found


# ----------------------------------------------------------------------------- deadlines


def test_a_stage_waits_per_site_a_worker_answers_in_turn(monkeypatch):
    monkeypatch.setenv(batched.NODES_ENV, "4")
    monkeypatch.setenv(batched.WORKERS_ENV, "2")
    settings = resolve(overrides=["sites=10", "secagg.enabled=true"])

    class Nodes:
        def get_node_ids(self):
            return [11, 12, 13, 14]

    grid = batched.grid_for(Nodes(), settings)
    every = [batched.virtual_id(s) for s in range(10)]  # loads 3, 3, 2, 2 on two workers
    assert deadlines.sites_in_sequence(grid, every) == 6
    assert deadlines.stage_deadline(2.0, grid, every) == 12.0
    assert deadlines.sites_in_sequence(grid, every[:2]) == 1  # two nodes, one site each
    monkeypatch.setenv(batched.NODES_ENV, "10")  # one node per site: they queue on the workers
    assert deadlines.sites_in_sequence(batched.grid_for(Nodes(), settings), every) == 5
    assert deadlines.stage_deadline(2.0, FakeGrid(settings, {}), every) == 2.0  # deployed


class OneWorkerGrid(BatchedFakeGrid):
    """The batched engine on one worker that answers the nodes in turn and, as Flower's Grid, keeps
    only the replies that came within the stage's deadline."""

    def send_and_receive(self, messages, *, timeout):
        self.exchanges += 1
        started, replies = time.monotonic(), []
        for msg in messages:
            reply = self._node(msg, self.contexts[msg.metadata.dst_node_id])
            if time.monotonic() - started <= timeout:
                replies.append(reply)
        return replies


def _slow(msg, context):
    time.sleep(0.6)
    return honest(msg, context)


@pytest.mark.parametrize("scaled", [True, False], ids=["scaled", "control"])
def test_sites_that_each_answer_in_time_are_not_failed_by_the_queue(tmp_path, monkeypatch, scaled):
    """Six sites on two nodes and one worker, each taking 0.6 s of its 1 s per stage: a stage
    takes 3.6 s. It completes; the control (the deadline not scaled) loses every site."""
    out = tmp_path / "run"
    overrides = [*BASE, "sites=6", "secagg.timeout=1", f"out={out}"]
    settings = resolve(overrides=overrides)
    monkeypatch.setenv(batched.NODES_ENV, "2")
    monkeypatch.setenv(batched.WORKERS_ENV, "1")
    if not scaled:
        monkeypatch.setattr(deadlines, "sites_in_sequence", lambda grid, destinations: 1)
    grid = OneWorkerGrid(settings, {i: _slow for i in range(6)}, nodes=2)
    run_server(grid, settings, out)
    row = json.loads((out / "history.jsonl").read_text().splitlines()[0])
    if scaled:
        assert row["sites_replied"] == 6 and row["secagg"]["survivors"] == list(range(1, 7))
    else:
        assert row["sites_replied"] == 0 and "no reply within 1 s" in json.dumps(row)


def test_a_round_that_can_only_time_out_is_refused_before_it_starts(tmp_path):
    out = tmp_path / "run"
    settings = resolve(overrides=[*BASE, "sites=4", "secagg.timeout=1e-9", f"out={out}"])
    grid = FakeGrid(settings, {i: honest for i in range(4)})
    with pytest.raises(ConfigError, match=r"secagg\.timeout=1e-09 s cannot be met"):
        run_server(grid, settings, out)
    assert grid.exchanges == 0, "refused before any stage was sent"
    floor = deadlines.site_work_floor(Stage.MASKED_INPUT, length=10**6, peers=40, bits=32)
    assert floor == pytest.approx(41 * 4e6 / deadlines.KEYSTREAM_FLOOR_BYTES_PER_SECOND)
