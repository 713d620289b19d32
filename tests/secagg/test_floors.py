"""The client holds its floors itself (issue 21, points 1 and 8), against the sites that take part.

Each test plays the server's attack on the core machines (the in-memory set-up of the harness) and
checks that the target site refuses before it releases the next thing, naming the floor.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from fedcore.secagg import (
    ClientState,
    EncodingConfig,
    Mode,
    SecAggClient,
    SessionConfig,
    TooFewSurvivors,
    decode_mean,
    run_in_memory,
)
from fedcore.secagg.floors import Floors
from fedcore.secagg.messages import (
    AdvertiseRequest,
    EncryptedShares,
    KeyAdvert,
    MaskedInput,
    UnmaskShares,
)

from .helpers import World, make_world, plain_sum

TARGET = 0
MODES = [Mode.SEMI_HONEST, Mode.ACTIVE]


def _offer(n: int, threshold: int, neighbors: int = 0) -> AdvertiseRequest:
    config = SessionConfig(
        round_id=b"r" * 16,
        clients=tuple(range(n)),
        threshold=threshold,
        length=4,
        neighbors=neighbors,
    )
    return AdvertiseRequest(TARGET, config)


# ----------------------------------------------------------------------------- point 8: the API


@pytest.mark.parametrize(
    ("n", "threshold", "neighbors", "reason"),
    [
        (5, 2, 0, "below the safe 3 for 5 participants"),
        (100, 2, 2, "degree 2 over 100"),
    ],
)
def test_a_client_refuses_an_unsafe_offer_by_default(n, threshold, neighbors, reason):
    client = SecAggClient(TARGET)
    with pytest.raises(RemoteProtocolError, match=reason):
        client.receive(_offer(n, threshold, neighbors))
    assert client.state is ClientState.ABORTED
    # Only the explicit, keyword-only flag lets an experiment through.
    assert isinstance(
        SecAggClient(TARGET, allow_unsafe=True).receive(_offer(n, threshold, neighbors)), KeyAdvert
    )


def test_the_unsafe_flag_keeps_the_operators_own_floors():
    client = SecAggClient(TARGET, floors=Floors(min_clients=10), allow_unsafe=True)
    with pytest.raises(RemoteProtocolError, match="'secagg-min-participants'"):
        client.receive(_offer(5, 2))


def test_the_harness_refuses_unsafe_settings_unless_asked():
    inputs = {c: np.arange(4, dtype=np.uint32) for c in range(5)}
    with pytest.raises(ConfigError, match="below the safe 3"):
        run_in_memory(inputs, threshold=2, seed=1)
    report = run_in_memory(inputs, threshold=2, seed=1, allow_unsafe=True)
    assert report.survivors == tuple(range(5))


# ----------------------------------------------------------------------------- point 1: takers


def _answer_all(w: World, *, skip: set[int] | frozenset[int] = frozenset()) -> dict[int, str]:
    """Every client not skipped answers; returns the refusals by client."""
    refused: dict[int, str] = {}
    for cid in sorted(w.requests):
        if cid in skip:
            continue
        try:
            w.server.receive(cid, w.answer(cid))
        except RemoteProtocolError as exc:
            refused[cid] = str(exc)
    return refused


def test_inviting_100_but_letting_13_take_part_is_refused_before_any_share_leaves():
    """The issue's attack: 100 sites invited, only the target and 12 colluders advertise; the
    others drop at once; t = 13 passes every rule for 100 invitees (SecAgg+ with 16 neighbours),
    and with 13 survivors the server would recover the target's exact update."""

    def attack(floors: Floors) -> tuple[World, dict[int, str]]:
        w = make_world(100, neighbors=16, threshold=13, length=4, seed=5, floors={TARGET: floors})
        w.auto_reveal = False
        others = set(range(13, 100))
        _answer_all(w, skip=others)  # the advertise stage: 87 sites never answer
        w.requests = w.server.advance(no_answer=w.server.pending)
        return w, _answer_all(w)  # the reveal stage, over U1 = {0..12}

    # Without the operator's floor the attack works: the round completes with the 13.
    w, refused = attack(Floors())
    assert not refused
    w.requests = w.server.advance(no_answer=w.server.pending)
    for _ in range(2):
        _answer_all(w)
        w.requests = w.server.advance(no_answer=w.server.pending)
    result = w.finish()
    assert result.survivors == frozenset(range(13))
    assert np.array_equal(result.total, plain_sum(w.inputs, range(13), 32))

    # The node config asked for 50 participants: the target refuses at the first stage that shows
    # it who takes part, before its reveal, its shares, its masked input.
    w, _ = attack(Floors(min_clients=50))
    client = w.clients[TARGET]
    assert client.state is ClientState.ABORTED
    assert isinstance(client.error, RemoteProtocolError)
    assert "13 sites advertised keys" in str(client.error)
    assert "'secagg-min-participants'" in str(client.error)
    assert isinstance(w.answers[TARGET], KeyAdvert)  # the last answer it gave
    with pytest.raises(TooFewSurvivors):  # the round cannot go on without the target's reveal
        w.server.advance(no_answer=w.server.pending)


@pytest.mark.parametrize("mode", MODES)
def test_the_floor_holds_against_the_senders_before_the_masked_input(mode):
    """Complete graph: all 10 advertise, 2 never send shares; the target asked for 9."""
    w = make_world(10, mode=mode, length=4, seed=6, floors={TARGET: Floors(min_clients=9)})
    w.step()  # advertise
    w.step(skip={8, 9})  # share keys
    with pytest.raises(RemoteProtocolError, match="8 sites sent this site shares that opened"):
        w.answer(TARGET)
    assert w.clients[TARGET].state is ClientState.ABORTED
    assert isinstance(w.answers[TARGET], EncryptedShares)  # no masked input left


@pytest.mark.parametrize("neighbors", [0, 6])
@pytest.mark.parametrize("mode", MODES)
def test_the_floor_holds_against_the_survivors_before_anything_is_unmasked(mode, neighbors):
    """All 10 share keys, 2 never send their masked input: U3 has 8 sites; the target asked for 9.
    It refuses to sign U3 (ACTIVE mode) or to reveal any unmask share."""
    floors = {TARGET: Floors(min_clients=9)}
    w = make_world(10, mode=mode, neighbors=neighbors, length=4, seed=7, floors=floors)
    w.step()  # advertise (and the reveal of a sparse graph)
    w.step()  # share keys
    w.step(skip={8, 9})  # masked input
    with pytest.raises(RemoteProtocolError, match="8 sites survived to the masked input"):
        w.answer(TARGET)
    assert w.clients[TARGET].state is ClientState.ABORTED
    assert isinstance(w.answers[TARGET], MaskedInput)  # neither a signature nor unmask shares


@pytest.mark.parametrize("neighbors", [0, 6])
@pytest.mark.parametrize("mode", MODES)
def test_a_round_that_keeps_enough_participants_completes(mode, neighbors):
    floors = {c: Floors(min_clients=8) for c in range(10)}
    w = make_world(10, mode=mode, neighbors=neighbors, length=4, seed=8, floors=floors)
    w.step()
    w.step()
    w.step(skip={8, 9})
    if mode is Mode.ACTIVE:
        w.step()
    result = w.finish()
    assert isinstance(w.answers[TARGET], UnmaskShares)
    assert np.array_equal(result.total, plain_sum(w.inputs, range(8), 32))


def test_a_rebuilt_client_keeps_its_floors():
    w = make_world(10, length=4, seed=9)
    w.step()
    w.step(skip={8, 9})
    history = w.history[TARGET]
    rebuilt = SecAggClient.rebuild(
        TARGET, history, rng=w.client_rng(TARGET), floors=Floors(min_clients=9)
    )
    with pytest.raises(RemoteProtocolError, match="'secagg-min-participants'"):
        rebuilt.receive(w.requests[TARGET], vector=w.inputs[TARGET])


# ----------------------------------------------------------------------------- decode_mean


@pytest.mark.parametrize(
    "weight",
    [0, 11, (1 << 32) - 1, (1 << 32) + 3],  # zero, over the budget, negative, beyond the ring
)
def test_decode_mean_refuses_a_total_weight_outside_the_budget(weight):
    cfg = EncodingConfig(bits=32, max_total_weight=10)
    total = np.array([5, weight], dtype=np.uint64)
    with pytest.raises(LocalProtocolError, match="max_total_weight=10|outside the ring"):
        decode_mean(total, config=cfg)
    assert decode_mean(np.array([5, 3], dtype=np.uint64), config=cfg)[1] == 3


def test_decode_mean_refuses_what_is_not_a_ring_vector():
    cfg = EncodingConfig(bits=32, max_total_weight=10)
    for total in (np.array([5.0, 3.0]), np.array([5, -3], dtype=np.int64)):
        with pytest.raises(LocalProtocolError):
            decode_mean(total, config=cfg)
