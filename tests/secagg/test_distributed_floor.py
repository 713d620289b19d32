"""Distributed DP's survivor floor in the protocol core, and the session bytes that bind it.

A distributed-DP session binds ``min_survivors``: each site's noise share is sized for that many
noisers, so every client refuses to sign or unmask a survivor set below it (a server that drops
sites to thin the noise gets no sum). Sessions without the section keep the bytes they always had
(the stored vectors of ``tests/vectors`` check that too)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedcore.crypto import CryptoRng
from fedcore.crypto.agreement import derive_rng
from fedcore.errors import ConfigError, InvalidMessage, RemoteProtocolError
from fedcore.secagg import SecAggClient, SecAggServer, SessionConfig, SessionEncoding, encode
from fedcore.secagg.config import DistributedSession, read_encoding, write_encoding
from fedcore.secagg.errors import TooFewSurvivors
from fedcore.secagg.messages import decode_server_message
from fedcore.secagg.session import session_id
from fedcore.secagg.wire import Reader, Writer
from tests.secagg.helpers import World, plain_sum

DIST = DistributedSession(
    noise="dgauss", gamma=64.0, site_noise=3.5, beta=0.6, min_survivors=4, colluders=1
)
PLAIN = SessionEncoding(clip=1.0, max_total_weight=5, dp_clip_norm=1.0)


def _world(encoding: SessionEncoding, *, n: int = 5, threshold: int = 3, seed: int = 0) -> World:
    master = CryptoRng.from_seed(seed, purpose="tests.secagg.distributed-floor")
    ids = list(range(1, n + 1))
    config = SessionConfig(
        round_id=master.bytes(16),
        clients=tuple(ids),
        threshold=threshold,
        length=8,
        bits=20,
        encoding=encoding,
    )
    keys = {c: master.bytes(32) for c in ids}
    clients = {
        c: SecAggClient(c, rng=derive_rng(keys[c], context=b"secagg|" + config.round_id))
        for c in ids
    }
    inputs = {c: master.integers_below_pow2(8, 20) for c in ids}
    world = World(config, SecAggServer(config), clients, inputs, keys, {}, None)
    world.requests = world.server.start()
    return world


def _round(encoding: SessionEncoding, dropped: set[int]):
    """Advertise, share, masked input (``dropped`` vanish there), unmask."""
    world = _world(encoding)
    world.step()  # advertise
    world.step()  # share keys
    world.step(skip=dropped)  # masked input
    refusals = []
    for cid in sorted(world.requests):
        try:
            world.server.receive(cid, world.answer(cid))
        except RemoteProtocolError as exc:
            refusals.append(str(exc))
    return world, refusals


def test_sites_refuse_to_unmask_below_the_sessions_survivor_floor():
    encoding = dataclasses.replace(PLAIN, distributed=DIST)  # min_survivors 4 of 5, t = 3
    world, refusals = _round(encoding, dropped={4, 5})  # 3 survivors: enough for t, not the noise
    assert len(refusals) == 3 and all("distributed-DP floor of 4" in r for r in refusals)
    with pytest.raises(TooFewSurvivors):
        world.server.finish(no_answer=world.server.pending)


def test_the_same_dropouts_unmask_without_the_floor_and_within_it():
    world, refusals = _round(PLAIN, dropped={4, 5})  # control: no distributed section
    assert refusals == []
    assert sorted(world.server.finish(no_answer=()).survivors) == [1, 2, 3]
    encoding = dataclasses.replace(PLAIN, distributed=DIST)
    world, refusals = _round(encoding, dropped={5})  # 4 survivors: at the floor
    assert refusals == []
    result = world.server.finish(no_answer=())
    assert np.array_equal(result.total, plain_sum(world.inputs, [1, 2, 3, 4], 20))


def _bytes(encoding: SessionEncoding) -> bytes:
    return write_encoding(Writer(), encoding).getvalue()


def test_a_session_without_the_section_keeps_its_bytes():
    # clip, max_total_weight, dp_clip_norm, then the flags byte (0: as the old bool False was)
    assert _bytes(PLAIN) == bytes.fromhex("000000000000f03f0500000000000000000000000000f03f00")
    counted = dataclasses.replace(PLAIN, count_unclipped=True)
    assert _bytes(counted)[-1] == 1  # as the old bool True was


def test_the_section_round_trips_and_the_session_id_hashes_it():
    encoding = dataclasses.replace(PLAIN, distributed=DIST)
    assert _bytes(encoding)[24] == 2  # bit 1: a distributed section follows
    assert read_encoding(Reader(_bytes(encoding))) == encoding
    config = SessionConfig(
        round_id=b"r" * 16, clients=(1, 2, 3, 4, 5), threshold=3, length=8, encoding=encoding
    )
    ids = set()
    for change in (
        {},
        {"gamma": 65.0},
        {"site_noise": 3.0},
        {"beta": 0.5},
        {"min_survivors": 3},
        {"colluders": 0},
        {"noise": "skellam"},
    ):
        changed = dataclasses.replace(encoding, distributed=dataclasses.replace(DIST, **change))
        ids.add(session_id(dataclasses.replace(config, encoding=changed), ()))
    assert len(ids) == 7
    # and the advertise request carries it to the sites unchanged
    world = _world(encoding)
    request = decode_server_message(encode(world.requests[1]))
    assert request.config.encoding == encoding


@pytest.mark.parametrize(
    "tail",
    [
        bytes([4]),  # an unknown flag
        bytes([2, 9]) + bytes(32),  # an unknown noise code
        bytes([2, 1]) + bytes(10),  # a truncated section
    ],
)
def test_a_malformed_section_is_refused_on_the_wire(tail):
    head = _bytes(PLAIN)[:-1]
    with pytest.raises(InvalidMessage):
        r = Reader(head + tail)
        read_encoding(r)
        r.done()


@pytest.mark.parametrize(
    "change",
    [
        {"gamma": float("nan")},
        {"site_noise": 0.0},
        {"beta": 1.0},
        {"colluders": 4},  # no honest noiser left at the floor
        {"min_survivors": 6},  # above the round's 5 clients
    ],
)
def test_an_invalid_section_is_refused(change):
    encoding = dataclasses.replace(PLAIN, distributed=dataclasses.replace(DIST, **change))
    with pytest.raises(ConfigError):
        SessionConfig(
            round_id=b"r" * 16, clients=(1, 2, 3, 4, 5), threshold=3, length=8, encoding=encoding
        )
