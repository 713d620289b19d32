"""One bad peer costs only itself, and nobody steers the SecAgg+ ring (issue 10, points 6, 7, 9).

Malicious clients are played through the in-memory harness (``run_in_memory(tamper=...)``: the
honest client answers, the malicious one rewrites its bytes on the wire) or, where a test must stop
between stages, through the step-by-step machines of ``helpers.World``. A malicious server is
played by rewriting the requests a client receives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest

from fedcore.crypto import CryptoRng
from fedcore.crypto.agreement import x25519_keypair
from fedcore.errors import InvalidMessage, LocalProtocolError, RemoteProtocolError
from fedcore.secagg import ClientState, SecAggClient, ServerState, Stage, TooFewSurvivors
from fedcore.secagg.graph import NeighborGraph, ring_reveal, ring_seed
from fedcore.secagg.harness import run_in_memory
from fedcore.secagg.messages import (
    EncryptedShare,
    EncryptedShares,
    KeyAdvert,
    MaskedInput,
    RevealRequest,
    RingReveal,
    ShareKeysRequest,
    ShareValue,
    UnmaskShares,
    decode_client_message,
    encode,
)
from fedcore.secagg.session import session_id

from .helpers import World, make_world, plain_sum

Tamper = Callable[[Stage, int, bytes], bytes]


def _inputs(n: int, length: int = 16, seed: int = 0) -> dict[int, np.ndarray]:
    rng = CryptoRng.from_seed(seed, purpose="tests.robustness.inputs")
    return {c: rng.integers_below_pow2(length, 32) for c in range(n)}


def _rewrite(stage: Stage, who: int, change: Callable[[object], object]) -> Tamper:
    def tamper(at: Stage, cid: int, data: bytes) -> bytes:
        if at is not stage or cid != who:
            return data
        return encode(change(decode_client_message(data)))  # type: ignore[arg-type]

    return tamper


def _garbage(receivers: set[int] | None = None) -> Callable[[object], object]:
    """Replace the sealed shares (for ``receivers``, or all) with random bytes of the same size."""
    rng = CryptoRng.from_seed(99, purpose="tests.robustness.garbage")

    def change(m: object) -> object:
        assert isinstance(m, EncryptedShares)
        shares = tuple(
            EncryptedShare(s.sender, s.receiver, rng.bytes(len(s.ciphertext)))
            if receivers is None or s.receiver in receivers
            else s
            for s in m.shares
        )
        return replace(m, shares=shares)

    return change


# ----------------------------------------------------------------------------- garbage shares


@pytest.mark.parametrize("neighbors", [None, 4])
def test_garbage_sealed_shares_cost_only_their_sender(neighbors: int | None) -> None:
    inputs = _inputs(9)
    report = run_in_memory(
        inputs, neighbors=neighbors, seed=1, tamper=_rewrite(Stage.SHARE, 3, _garbage())
    )
    assert report.survivors == (0, 1, 2, 4, 5, 6, 7, 8)  # every honest receiver dropped 3 only
    assert (report.total == plain_sum(inputs, report.survivors, 32)).all()
    server = report.server
    assert server is not None and set(server.unopened) == {3}
    assert not server.culprits and 3 not in server.failed


def test_garbage_to_one_receiver_leaves_the_sender_out_and_names_the_reporter() -> None:
    inputs = _inputs(6)
    report = run_in_memory(inputs, seed=2, tamper=_rewrite(Stage.SHARE, 4, _garbage({1})))
    assert report.survivors == (0, 1, 2, 3, 5)
    assert (report.total == plain_sum(inputs, report.survivors, 32)).all()
    assert report.server is not None and report.server.unopened == {4: frozenset({1})}


def test_a_receiver_that_falsely_reports_a_sender_reveals_no_more_than_its_dropping_out() -> None:
    """The server cannot tell a garbage sender from a lying receiver: the reported sender is left
    out (as a dropout would be), and nothing more of it is revealed than of a dropout. (The liar
    did mask with it, so the sum is spoilt, as any site can spoil it with a bad masked input; the
    federation round's plausibility check then discards it.)"""
    inputs = _inputs(6)

    def lie(m: object) -> object:
        assert isinstance(m, MaskedInput)
        return replace(m, unopened=(5,))  # 5's share opened fine at 0

    report = run_in_memory(inputs, seed=3, tamper=_rewrite(Stage.MASKED_INPUT, 0, lie))
    # What the attack cannot do is make anyone reveal both shares of 5: only mask-key shares of 5
    # were asked for, as for a dropout.
    server = report.server
    assert server is not None and 5 not in report.survivors
    recovery = server._recovery
    assert recovery is not None
    assert 5 not in recovery.seed_shares and 5 in recovery.key_shares


def test_partial_garbage_that_leaves_a_mask_key_unrecoverable_ends_the_round_before_unmask() -> (
    None
):
    """Garbage to all but one neighbour: that one masked with the sender, the others hold no
    share of its mask key, so the pairwise mask cannot be removed: the round ends before anyone
    is asked to unmask, and the reason names the sender."""
    w = make_world(5, threshold=3, seed=4)
    w.step()
    answer = w.answer(2)
    bad = _garbage({0, 1, 3})(answer)
    w.server.receive(2, bad)  # type: ignore[arg-type]
    for cid in (0, 1, 3, 4):
        w.server.receive(cid, w.answer(cid))
    w.requests = w.server.advance()
    for cid in sorted(w.requests):
        w.server.receive(cid, w.answer(cid))
    with pytest.raises(TooFewSurvivors, match="client 2's mask key"):
        w.server.advance()
    assert w.server.state is ServerState.ABORTED


# ----------------------------------------------------------------------------- wrong Shamir shares


def _wrong_share(kind: str) -> Callable[[object], object]:
    def change(m: object) -> object:
        assert isinstance(m, UnmaskShares)
        values = m.seed_shares if kind == "seed" else m.key_shares
        bad = (ShareValue(values[0].owner, values[0].value ^ 0xFF), *values[1:])
        return replace(m, **{f"{kind}_shares": bad})

    return change


@pytest.mark.parametrize("kind", ["seed", "key"])
def test_a_wrong_shamir_share_is_decoded_around_and_its_sender_named(kind: str) -> None:
    inputs = _inputs(8)
    report = run_in_memory(
        inputs,
        seed=5,
        dropouts={"masked_input": [7]},  # so that mask-key shares are revealed too
        tamper=_rewrite(Stage.UNMASK, 0, _wrong_share(kind)),
    )
    assert report.survivors == (0, 1, 2, 3, 4, 5, 6)
    assert (report.total == plain_sum(inputs, report.survivors, 32)).all()
    server = report.server
    assert server is not None and set(server.culprits) == {0}
    assert ("self-mask seed" if kind == "seed" else "mask key") in server.culprits[0]


def test_wrong_shares_beyond_what_can_be_decoded_end_the_round_with_a_typed_error() -> None:
    w = make_world(5, threshold=3, seed=6)
    w.step()
    w.step()
    w.step()
    for cid in (0, 1, 2):  # three of five holders lie about client 4's seed: no decoding left
        answer = w.answer(cid)
        assert isinstance(answer, UnmaskShares)
        seeds = tuple(
            ShareValue(s.owner, s.value ^ (0xABCDEF << (20 * cid))) if s.owner == 4 else s
            for s in answer.seed_shares
        )
        w.server.receive(cid, replace(answer, seed_shares=seeds))
        w.requests.pop(cid)
    with pytest.raises(InvalidMessage, match="client 4's self-mask seed"):
        w.finish()
    assert w.server.state is ServerState.ABORTED


# ----------------------------------------------------------------------------- the reveal stage


def _at_share_keys(n: int = 8, seed: int = 7) -> World:
    w = make_world(n, neighbors=2, threshold=2, seed=seed)
    w.auto_reveal = False
    w.step()  # advertise
    assert isinstance(w.requests[0], RevealRequest)
    w.step()  # reveal
    assert isinstance(w.requests[0], ShareKeysRequest) and w.requests[0].reveals
    return w


def _expect_abort(w: World, cid: int, message: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        w.clients[cid].receive(message)  # type: ignore[arg-type]
    assert w.clients[cid].state is ClientState.ABORTED


def test_a_client_refuses_a_ring_drawn_without_every_members_reveal() -> None:
    w = _at_share_keys()
    request = w.requests[0]
    assert isinstance(request, ShareKeysRequest)
    # a server that drops member 5's reveal after seeing the others' (to reshape the ring)
    withheld = replace(request, reveals=tuple(r for r in request.reveals if r.sender != 5))
    _expect_abort(w, 0, withheld, RemoteProtocolError)
    w = _at_share_keys()
    request = w.requests[0]
    forged = tuple(
        replace(r, reveal=bytes(32)) if r.sender == 5 else r
        for r in request.reveals  # type: ignore[union-attr]
    )
    _expect_abort(w, 0, replace(request, reveals=forged), InvalidMessage)
    # ... or that drops member 5 altogether after the reveals: U1 was fixed at the reveal stage
    w = _at_share_keys()
    request = w.requests[0]
    assert isinstance(request, ShareKeysRequest)
    shrunk = replace(
        request,
        adverts=tuple(a for a in request.adverts if a.sender != 5),
        reveals=tuple(r for r in request.reveals if r.sender != 5),
    )
    _expect_abort(w, 0, shrunk, RemoteProtocolError)


def test_a_client_refuses_a_sparse_round_that_skips_the_reveal() -> None:
    """The server may not choose the ring itself: a share-keys request straight after the
    advertise stage of a sparse session is not a legal transition."""
    w = make_world(8, neighbors=2, threshold=2, seed=8)
    w.auto_reveal = False
    w.step()
    request = w.requests[0]
    assert isinstance(request, RevealRequest)
    skipped = ShareKeysRequest(0, request.round_id, request.adverts)
    _expect_abort(w, 0, skipped, LocalProtocolError)


def test_a_member_that_withholds_or_forges_its_reveal_ends_the_round_before_any_share() -> None:
    w = make_world(8, neighbors=2, threshold=2, seed=9)
    w.auto_reveal = False
    w.step()
    forged = RingReveal(3, w.config.round_id, bytes(32))
    with pytest.raises(InvalidMessage):
        w.server.receive(3, forged)
    assert 3 in w.server.failed and w.server.state is ServerState.REVEAL
    for cid in sorted(w.requests):
        if cid not in (3, 6):  # 6 stays silent
            w.server.receive(cid, w.answer(cid))
    with pytest.raises(TooFewSurvivors, match=r"clients \[3, 6\]"):
        w.server.advance(no_answer=w.server.pending)
    assert w.server.state is ServerState.ABORTED


def test_a_member_that_drops_after_revealing_is_an_ordinary_dropout() -> None:
    inputs = _inputs(10)
    report = run_in_memory(
        inputs, neighbors=4, threshold=3, seed=10, dropouts={"share": [2], "masked_input": [7]}
    )
    assert report.survivors == (0, 1, 3, 4, 5, 6, 8, 9)
    assert (report.total == plain_sum(inputs, report.survivors, 32)).all()


# ----------------------------------------------------------------------------- graph grinding

N, K, TARGET = 20, 4, 0
COLLUDERS = (16, 17, 18, 19)  # they advertise last


def _honest_adverts(w: World) -> list[KeyAdvert]:
    out = []
    for cid in range(N):
        if cid not in COLLUDERS:
            advert = w.answer(cid)
            assert isinstance(advert, KeyAdvert)
            w.server.receive(cid, advert)
            out.append(advert)
    return out


def _colluder(cid: int, attempt: int) -> SecAggClient:
    return SecAggClient(cid, rng=CryptoRng.from_seed(1000 * attempt + cid, purpose="tests.grind"))


def _around_target(ring: NeighborGraph) -> int:
    return len(ring.neighbors(TARGET) & set(COLLUDERS))


def _ring_after_reveals(w: World) -> NeighborGraph:
    """Run the reveal stage through the real machines; the ring every client then draws."""
    w.requests = w.server.advance()
    for cid in sorted(w.requests):
        w.server.receive(cid, w.answer(cid))
    w.requests = w.server.advance()
    request = w.requests[TARGET]
    assert isinstance(request, ShareKeysRequest)
    w.clients[TARGET].receive(request)  # the target accepts this ring
    seed = ring_seed(w.config.round_id, {r.sender: r.reveal for r in request.reveals})
    return NeighborGraph(range(N), neighbors=K, seed=seed)


def test_colluders_advertising_last_can_no_longer_grind_the_ring() -> None:
    """The old attack: the last advertisers re-draw their keys until the ring keyed by the hash
    of all adverts (the session id) puts t of them around the target. It still finds such keys
    quickly, since it can still evaluate the old formula, but the ring is now drawn from reveals
    that the honest members open only after every advert is fixed: the ground keys buy nothing."""
    w = make_world(N, neighbors=K, seed=11, length=4)
    t = w.config.threshold
    honest = _honest_adverts(w)
    found = None
    for attempt in range(3000):
        colluders = {c: _colluder(c, attempt) for c in COLLUDERS}
        adverts = honest + [colluders[c].receive(w.requests[c]) for c in COLLUDERS]
        old = NeighborGraph(range(N), neighbors=K, seed=session_id(w.config, adverts))
        if _around_target(old) >= t:
            found = attempt
            break
    assert found is not None  # the grind still succeeds against the old ring (try 35, 0.08 s)
    for c in COLLUDERS:  # the colluders now advertise the keys they ground, honestly otherwise
        w.clients[c] = _colluder(c, found)
        w.server.receive(c, w.answer(c))
    ring = _ring_after_reveals(w)
    assert _around_target(ring) < t  # they hold fewer than t of the target's shares


def test_re_drawn_keys_do_not_move_a_colluder_relative_to_the_target() -> None:
    """Keys do not enter the ring at all: a colluder that re-draws its keys (keeping the
    commitment it must open) lands in the same place every time, while the old session-id-keyed
    ring moved with every draw."""
    positions, old_positions = set(), set()
    for attempt in range(12):
        w = make_world(N, neighbors=K, seed=12, length=4)
        _honest_adverts(w)
        adverts = {}
        for c in COLLUDERS:
            advert = w.answer(c)
            assert isinstance(advert, KeyAdvert)
            if c == 19:
                rng = CryptoRng.from_seed(attempt, purpose="tests.redraw")
                advert = replace(
                    advert, enc_public=x25519_keypair(rng)[1], mask_public=x25519_keypair(rng)[1]
                )
            adverts[c] = advert
            w.server.receive(c, advert)
        w.requests = w.server.advance()
        # the colluder knows its own seed: it opens its commitment
        seed_19 = w.clients[19]._keys.seed
        for cid in sorted(w.requests):
            reveal = (
                RingReveal(19, w.config.round_id, ring_reveal(w.config.round_id, 19, seed_19))
                if cid == 19
                else w.answer(cid)
            )
            w.server.receive(cid, reveal)
        w.requests = w.server.advance()
        request = w.requests[TARGET]
        assert isinstance(request, ShareKeysRequest)
        ring = NeighborGraph(
            range(N),
            neighbors=K,
            seed=ring_seed(w.config.round_id, {r.sender: r.reveal for r in request.reveals}),
        ).ring
        positions.add((ring.index(19) - ring.index(TARGET)) % N)
        old = NeighborGraph(range(N), neighbors=K, seed=session_id(w.config, request.adverts)).ring
        old_positions.add((old.index(19) - old.index(TARGET)) % N)
    assert len(positions) == 1
    assert len(old_positions) > 3  # the old ring let each draw move the colluder


# ----------------------------------------------------------------------------- bad bytes from peers


def test_random_forged_and_replayed_messages_cost_only_their_sender() -> None:
    w = make_world(6, threshold=3, seed=13, allow_unsafe=True)
    rng = CryptoRng.from_seed(13, purpose="tests.robustness.bytes")
    w.step()  # advertise
    first_round_advert = w.answers[5]
    # random bytes from 0, a replayed advert from 5 (a message of a finished stage), and a
    # share message from 1 in 2's name: each closes that sender's slot only
    with pytest.raises(InvalidMessage):
        w.server.receive_bytes(0, rng.bytes(200))
    with pytest.raises(RemoteProtocolError):
        w.server.receive(5, first_round_advert)
    forged = w.answer(2)
    with pytest.raises(RemoteProtocolError):
        w.server.receive(1, forged)
    assert set(w.server.failed) == {0, 1, 5} and w.server.state is ServerState.SHARE
    for cid in (2, 3, 4):
        w.server.receive(cid, w.answers[cid] if cid == 2 else w.answer(cid))
    w.requests = w.server.advance(no_answer=w.server.pending)
    w.step()
    result = w.finish()
    assert result.survivors == frozenset({2, 3, 4})
    assert (result.total.astype(np.uint64) == plain_sum(w.inputs, result.survivors, 32)).all()


def test_random_bytes_from_the_server_abort_only_that_client() -> None:
    w = make_world(4, threshold=2, seed=14, allow_unsafe=True)
    rng = CryptoRng.from_seed(14, purpose="tests.robustness.bytes")
    with pytest.raises(InvalidMessage):
        w.clients[0].receive_bytes(rng.bytes(100))
    assert w.clients[0].state is ClientState.ABORTED
    assert w.clients[1].state is ClientState.WAIT_ADVERTISE
