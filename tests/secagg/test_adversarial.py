"""The rules an honest client and the server enforce against a misbehaving peer."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.crypto import signing
from fedcore.errors import InvalidMessage, LocalProtocolError, RemoteProtocolError
from fedcore.secagg import ClientState, Mode, ServerState, TooFewSurvivors
from fedcore.secagg.messages import (
    ConsistencySignature,
    EncryptedShares,
    KeyAdvert,
    MaskedInput,
    MaskedInputRequest,
    ShareKeysRequest,
    ShareValue,
    UnmaskRequest,
    UnmaskShares,
)

from .helpers import World, make_world, plain_sum

# The order-8 point of Curve25519 (RFC 7748 section 6.1 lists all small-order points' roles):
# agreement with it gives the all-zero secret for every private key.
SMALL_ORDER = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


def _to_unmask(w: World, *, skip_masked: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    w.step()
    w.step()
    w.step(skip=skip_masked)
    if w.config.mode is Mode.ACTIVE:
        w.step()


def _expect_abort(w: World, cid: int, message: object, error: type[Exception], **kw: object):
    with pytest.raises(error):
        w.clients[cid].receive(message, **kw)  # type: ignore[arg-type]
    assert w.clients[cid].state is ClientState.ABORTED


# ----------------------------------------------------------------------------- client rules


@settings(max_examples=20, deadline=None, derandomize=True)
@given(data=st.data())
def test_client_never_reveals_both_shares_of_a_peer(data: st.DataObject) -> None:
    w = make_world(7, threshold=3, seed=1, allow_unsafe=True)
    _to_unmask(w, skip_masked={5, 6})
    request = w.requests[0]
    assert isinstance(request, UnmaskRequest)
    overlap = data.draw(st.sets(st.sampled_from(range(1, 7)), min_size=1))
    alive = tuple(sorted(set(request.alive) | overlap))
    dropped = tuple(sorted(set(request.dropped) | overlap))
    _expect_abort(w, 0, replace(request, alive=alive, dropped=dropped), RemoteProtocolError)


def test_client_refuses_to_unmask_below_threshold() -> None:
    w = make_world(6, threshold=4, seed=2)
    _to_unmask(w)
    request = w.requests[0]
    assert isinstance(request, UnmaskRequest)
    # consistent with the client's view (all of them sent shares), but only 3 alive
    forged = replace(request, alive=(0, 1, 2), dropped=(3, 4, 5))
    _expect_abort(w, 0, forged, TooFewSurvivors)


def test_client_refuses_unaccounted_or_phantom_peers() -> None:
    w = make_world(5, threshold=3, seed=3)
    _to_unmask(w)
    request = w.requests[0]
    assert isinstance(request, UnmaskRequest)
    _expect_abort(w, 0, replace(request, alive=(0, 1, 2)), RemoteProtocolError)  # 3, 4 vanish
    w = make_world(5, threshold=3, seed=3)
    w.step()
    w.step(skip={4})  # client 4 never shares keys ...
    w.step()
    request = w.requests[0]
    assert isinstance(request, UnmaskRequest) and 4 not in request.alive
    # ... so the server cannot claim it alive (or dropped) to this client
    _expect_abort(w, 0, replace(request, alive=(0, 1, 2, 3, 4)), RemoteProtocolError)
    w2 = make_world(5, threshold=3, seed=3)
    w2.step()
    w2.step(skip={4})
    w2.step()
    req2 = w2.requests[0]
    assert isinstance(req2, UnmaskRequest)
    _expect_abort(w2, 0, replace(req2, dropped=(4,)), RemoteProtocolError)
    w3 = make_world(5, threshold=3, seed=3)
    _to_unmask(w3)
    req3 = w3.requests[1]
    assert isinstance(req3, UnmaskRequest)
    _expect_abort(w3, 1, replace(req3, alive=(0, 2, 3, 4), dropped=(1,)), RemoteProtocolError)


def test_client_refuses_duplicate_public_keys() -> None:
    w = make_world(4, seed=4)
    w.step()
    request = w.requests[0]
    assert isinstance(request, ShareKeysRequest)
    a1, a2 = request.adverts[1], request.adverts[2]
    cloned = replace(a2, enc_public=a1.enc_public)
    adverts = (request.adverts[0], a1, cloned, request.adverts[3])
    _expect_abort(w, 0, replace(request, adverts=adverts), RemoteProtocolError)
    w = make_world(4, seed=4)
    w.step()
    request = w.requests[0]
    own = request.adverts[0]  # type: ignore[union-attr]
    twice = replace(own, sender=3)
    adverts = (own, *request.adverts[1:3], twice)  # type: ignore[union-attr]
    _expect_abort(w, 0, replace(request, adverts=adverts), RemoteProtocolError)


def test_client_refuses_all_zero_key_agreement() -> None:
    w = make_world(4, seed=5)
    w.step()
    request = w.requests[0]
    assert isinstance(request, ShareKeysRequest)
    evil = replace(request.adverts[2], enc_public=SMALL_ORDER)
    adverts = (*request.adverts[:2], evil, request.adverts[3])
    _expect_abort(w, 0, replace(request, adverts=adverts), InvalidMessage)
    # the mask-seed agreement goes through the same check
    from fedcore.secagg.session import pairwise_seed

    for point in (SMALL_ORDER, bytes(32), (1).to_bytes(32, "little")):
        with pytest.raises(InvalidMessage):
            pairwise_seed(bytes(range(32)), point, b"session", 0, 1)


def test_client_refuses_messages_for_another_recipient_or_round() -> None:
    w = make_world(4, seed=6)
    request = w.requests[0]
    _expect_abort(w, 0, replace(request, recipient=1), RemoteProtocolError)
    w = make_world(4, seed=6)
    w.step()
    request = w.requests[0]
    assert isinstance(request, ShareKeysRequest)
    _expect_abort(w, 0, replace(request, round_id=b"another round"), RemoteProtocolError)
    w = make_world(4, seed=6)
    w.step()
    request = w.requests[0]
    advert = replace(request.adverts[1], round_id=b"another round")  # type: ignore[union-attr]
    adverts = (request.adverts[0], advert, *request.adverts[2:])  # type: ignore[union-attr]
    _expect_abort(w, 0, replace(request, adverts=adverts), RemoteProtocolError)


def test_client_refuses_an_advert_set_without_its_own_advert() -> None:
    w = make_world(4, seed=7)
    w.step()
    request = w.requests[0]
    assert isinstance(request, ShareKeysRequest)
    _expect_abort(w, 0, replace(request, adverts=request.adverts[1:]), RemoteProtocolError)


def test_client_refuses_shares_addressed_to_someone_else() -> None:
    w = make_world(4, seed=8)
    w.step()
    w.step()
    mine, theirs = w.requests[0], w.requests[1]
    assert isinstance(mine, MaskedInputRequest) and isinstance(theirs, MaskedInputRequest)
    stolen = theirs.shares[0]  # addressed to client 1
    forged = replace(mine, shares=(*mine.shares[1:], stolen))
    _expect_abort(w, 0, forged, RemoteProtocolError, vector=w.inputs[0])
    # relabelled as if for client 0: the sealed binding of the receiver makes it fail to open, and
    # client 0 treats that sender as dropped (no share of it, no mask with it) instead of aborting
    w = make_world(4, seed=8)
    w.step()
    w.step()
    mine, theirs = w.requests[0], w.requests[1]
    relabelled = replace(theirs.shares[1], receiver=0)  # type: ignore[union-attr]
    rest = [s for s in mine.shares if s.sender != relabelled.sender]  # type: ignore[union-attr]
    forged = replace(mine, shares=(*rest, relabelled))
    answer = w.clients[0].receive(forged, vector=w.inputs[0])
    assert isinstance(answer, MaskedInput) and answer.unopened == (relabelled.sender,)
    assert w.clients[0].state is not ClientState.ABORTED


def test_client_treats_shares_from_another_session_as_unopened() -> None:
    """Shown a different advert set, a client derives another session id: nothing opens."""
    w = make_world(5, threshold=3, seed=9)
    w.step()
    request = w.requests[0]
    assert isinstance(request, ShareKeysRequest)
    forked = w.clients[0].receive(replace(request, adverts=request.adverts[:4]))  # hides 4
    assert isinstance(forked, EncryptedShares)
    w.step(skip={0})  # everyone else shares keys in the genuine session
    genuine = w.requests[1]
    assert isinstance(genuine, MaskedInputRequest)
    from_0 = next(s for s in forked.shares if s.receiver == 1)
    forged = replace(genuine, shares=(from_0, *genuine.shares))
    answer = w.clients[1].receive(forged, vector=w.inputs[1])
    assert isinstance(answer, MaskedInput) and answer.unopened == (0,)


def test_client_refuses_shares_from_non_neighbours() -> None:
    w = make_world(9, neighbors=2, threshold=2, seed=10)
    w.step()
    w.step()
    mine = w.requests[0]
    assert isinstance(mine, MaskedInputRequest)
    senders = {s.sender for s in mine.shares}
    other = next(
        c
        for c in range(1, 9)
        if c not in senders
        and isinstance(w.requests[c], MaskedInputRequest)
        and w.requests[c].shares  # type: ignore[union-attr]
    )
    foreign = w.requests[other].shares[0]  # type: ignore[union-attr]
    forged = replace(mine, shares=(*mine.shares, replace(foreign, receiver=0)))
    _expect_abort(w, 0, forged, RemoteProtocolError, vector=w.inputs[0])


# ----------------------------------------------------------------------------- active mode


def test_active_client_checks_advert_signatures() -> None:
    w = make_world(4, mode=Mode.ACTIVE, seed=12)
    w.step()
    request = w.requests[0]
    assert isinstance(request, ShareKeysRequest)
    bad = replace(request.adverts[2], signature=bytes(64))
    adverts = (*request.adverts[:2], bad, request.adverts[3])
    _expect_abort(w, 0, replace(request, adverts=adverts), InvalidMessage)
    w = make_world(4, mode=Mode.ACTIVE, seed=12)
    w.step()
    request = w.requests[0]
    unsigned = replace(request.adverts[1], signature=b"")  # type: ignore[union-attr]
    adverts = (request.adverts[0], unsigned, *request.adverts[2:])  # type: ignore[union-attr]
    _expect_abort(w, 0, replace(request, adverts=adverts), RemoteProtocolError)


def test_active_server_rejects_sybil_adverts() -> None:
    w = make_world(4, mode=Mode.ACTIVE, seed=13)
    advert = w.answer(1)
    assert isinstance(advert, KeyAdvert)
    forged_sig = signing.sign(bytes(32), b"not the registered key")
    with pytest.raises(InvalidMessage):
        w.server.receive(1, replace(advert, signature=forged_sig))
    assert 1 in w.server.failed and w.server.state is ServerState.ADVERTISE


def test_active_client_checks_consistency_signatures() -> None:
    w = make_world(5, mode=Mode.ACTIVE, threshold=4, seed=14)
    _to_unmask(w)
    request = w.requests[0]
    assert isinstance(request, UnmaskRequest) and len(request.signatures) == 5
    _expect_abort(w, 0, replace(request, signatures=request.signatures[:3]), TooFewSurvivors)
    w = make_world(5, mode=Mode.ACTIVE, threshold=4, seed=14)
    _to_unmask(w)
    request = w.requests[0]
    forged = ConsistencySignature(4, w.config.round_id, bytes(64))
    sigs = (*request.signatures[:4], forged)  # type: ignore[union-attr]
    _expect_abort(w, 0, replace(request, signatures=sigs), InvalidMessage)
    w = make_world(5, mode=Mode.ACTIVE, threshold=4, seed=14)
    _to_unmask(w)
    request = w.requests[0]
    sigs = (*request.signatures, request.signatures[1])  # type: ignore[union-attr]
    _expect_abort(w, 0, replace(request, signatures=sigs), RemoteProtocolError)


def test_active_client_refuses_an_alive_set_it_did_not_sign() -> None:
    w = make_world(5, mode=Mode.ACTIVE, threshold=3, seed=15, allow_unsafe=True)
    _to_unmask(w)
    request = w.requests[0]
    assert isinstance(request, UnmaskRequest)
    forged = replace(request, alive=(0, 1, 2, 3), dropped=(4,))
    _expect_abort(w, 0, forged, RemoteProtocolError)


# ----------------------------------------------------------------------------- server rules


def test_server_closes_the_slot_of_a_misbehaving_client_and_goes_on() -> None:
    w = make_world(6, threshold=3, seed=16, allow_unsafe=True)
    w.step()
    w.step()
    good = w.answer(1)
    assert isinstance(good, MaskedInput)
    with pytest.raises(RemoteProtocolError):
        w.server.receive(2, good)  # client 2 relays client 1's input in 1's name
    assert 2 in w.server.failed
    w.server.receive(1, good)
    with pytest.raises(RemoteProtocolError):
        w.server.receive(1, good)  # a duplicate is refused but the first answer stands
    assert 1 not in w.server.failed
    short = MaskedInput(3, w.config.round_id, 32, np.zeros(3, dtype=np.uint32))
    w.answer(3)
    with pytest.raises(RemoteProtocolError):
        w.server.receive(3, short)
    for cid in (0, 4, 5):
        w.server.receive(cid, w.answer(cid))
    w.requests = w.server.advance(no_answer=w.server.pending)
    result = w.finish()
    assert result.survivors == frozenset({0, 1, 4, 5})
    np.testing.assert_array_equal(
        result.total.astype(np.uint64), plain_sum(w.inputs, result.survivors, 32)
    )


def test_server_refuses_duplicate_and_small_order_keys() -> None:
    w = make_world(4, threshold=2, seed=17, allow_unsafe=True)
    a0 = w.answer(0)
    w.server.receive(0, a0)
    a1 = w.answer(1)
    assert isinstance(a0, KeyAdvert) and isinstance(a1, KeyAdvert)
    with pytest.raises(RemoteProtocolError):
        w.server.receive(1, replace(a1, mask_public=a0.mask_public))
    a2 = w.answer(2)
    with pytest.raises(InvalidMessage):
        w.server.receive(2, replace(a2, enc_public=SMALL_ORDER))  # type: ignore[type-var]
    assert set(w.server.failed) == {1, 2}
    # one site failing at key setup does not halt the round (Flower 1.41's did)
    w.server.receive(3, w.answer(3))
    w.requests = w.server.advance(no_answer=w.server.pending)
    w.step()
    w.step()
    result = w.finish()
    assert result.survivors == frozenset({0, 3})
    np.testing.assert_array_equal(
        result.total.astype(np.uint64), plain_sum(w.inputs, result.survivors, 32)
    )


def test_server_refuses_shares_that_skip_a_neighbour() -> None:
    w = make_world(4, seed=18)
    w.step()
    answer = w.answer(0)
    assert isinstance(answer, EncryptedShares)
    with pytest.raises(RemoteProtocolError):
        w.server.receive(0, replace(answer, shares=answer.shares[1:]))


def test_server_rebuilds_around_a_corrupted_unmask_share_and_names_its_sender() -> None:
    w = make_world(5, threshold=3, seed=19)
    _to_unmask(w)
    answer = w.answer(0)
    assert isinstance(answer, UnmaskShares)
    first = answer.seed_shares[1]
    corrupted = replace(
        answer,
        seed_shares=(
            answer.seed_shares[0],
            ShareValue(first.owner, first.value ^ 1),
            *answer.seed_shares[2:],
        ),
    )
    w.server.receive(0, corrupted)
    w.requests.pop(0)
    result = w.finish()
    assert w.server.state is ServerState.DONE
    assert set(w.server.culprits) == {0} and "self-mask seed" in w.server.culprits[0]
    np.testing.assert_array_equal(
        result.total.astype(np.uint64), plain_sum(w.inputs, result.survivors, 32)
    )


def test_server_refuses_unmask_shares_of_the_wrong_kind() -> None:
    w = make_world(5, threshold=3, seed=20)
    _to_unmask(w, skip_masked={4})
    answer = w.answer(0)
    assert isinstance(answer, UnmaskShares) and answer.key_shares
    # claim client 4's *seed* share too (it dropped): the server must not accept it
    extra = ShareValue(4, answer.key_shares[0].value)
    with pytest.raises(RemoteProtocolError):
        w.server.receive(0, replace(answer, seed_shares=(*answer.seed_shares, extra)))


# ----------------------------------------------------------------------------- bad local input


@pytest.mark.parametrize(
    "vector",
    [
        np.zeros(7, dtype=np.uint32),  # wrong length
        np.zeros((2, 4), dtype=np.uint32),  # wrong shape
        np.zeros(0, dtype=np.uint32),  # empty
        np.full(8, np.nan),  # NaN
        np.full(8, np.inf),  # infinite
        np.full(8, -1, dtype=np.int64),  # negative
        np.full(8, 1 << 40, dtype=np.uint64),  # outside the ring
        [0] * 8,  # not an array
    ],
)
def test_client_refuses_bad_input_vectors(vector: object) -> None:
    w = make_world(3, threshold=2, length=8, seed=21)
    w.step()
    w.step()
    _expect_abort(w, 0, w.requests[0], LocalProtocolError, vector=vector)
