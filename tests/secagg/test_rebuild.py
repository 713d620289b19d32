"""A rebuilt client answers every later stage byte for byte as the original does.

Replay skips work (no sealing at the share-keys stage, no masks at the masked-input stage), so
these tests compare the wire bytes of every answer a rebuilt client can give with the original's,
in both modes, on the complete and a sparse graph, with a dropout before the masked input.
"""

from __future__ import annotations

import pytest

from fedcore.crypto import CryptoRng
from fedcore.errors import ConfigError
from fedcore.secagg import Mode, SecAggClient, shamir
from fedcore.secagg.messages import encode

from .helpers import World, make_world, plain_sum


def _rebuild(w: World, cid: int) -> SecAggClient:
    active = w.config.mode is Mode.ACTIVE
    return SecAggClient.rebuild(
        cid,
        w.history[cid],
        rng=w.client_rng(cid),
        signing_key=w.signing_keys[cid] if active else None,
        registry=w.registry,
    )


def _answers_like_the_original(w: World, rebuilt: dict[int, SecAggClient]) -> None:
    """Each rebuilt client answers the request the original answered last; same bytes."""
    for cid, client in rebuilt.items():
        request = w.history[cid][-1]
        vector = w.inputs[cid] if type(request).__name__ == "MaskedInputRequest" else None
        again = encode(client.receive(request, vector=vector))
        assert again == encode(w.answers[cid]), f"client {cid}, {type(request).__name__}"


@pytest.mark.parametrize("mode", [Mode.SEMI_HONEST, Mode.ACTIVE])
@pytest.mark.parametrize("neighbors", [0, 4])
def test_rebuilt_client_answers_byte_identically_at_every_stage(mode: Mode, neighbors: int) -> None:
    w = make_world(9, neighbors=neighbors, mode=mode, length=300, seed=3)
    stages = 4 if mode is Mode.ACTIVE else 3  # advertise, share keys, masked input, (consistency)
    for stage in range(stages):
        skip = {2} if stage == 2 else set()  # client 2 drops before sending its masked input
        if stage >= 1:  # rebuild from the history so far, before the originals answer
            rebuilt = {c: _rebuild(w, c) for c in w.requests if c not in skip}
            for c in rebuilt:
                assert rebuilt[c].state is w.clients[c].state
                assert rebuilt[c].session_id == w.clients[c].session_id
        w.step(skip=skip)
        if stage >= 1:
            _answers_like_the_original(w, rebuilt)
    rebuilt = {c: _rebuild(w, c) for c in w.requests}  # full history: unmask stage next
    result = w.finish()
    _answers_like_the_original(w, rebuilt)
    assert 2 not in result.survivors
    assert (result.total == plain_sum(w.inputs, result.survivors, 32)).all()


@pytest.mark.parametrize(("n", "t"), [(1, 1), (5, 3), (40, 21)])
def test_share_of_draws_what_split_draws_and_gives_one_holders_shares(n: int, t: int) -> None:
    holders = [3 * i + 1 for i in range(n)]
    secrets = [bytes(range(32)), bytes(range(5, 37))]
    full_rng = CryptoRng.from_seed(n, purpose="share_of")
    full = shamir.split(secrets, holders=holders, threshold=t, rng=full_rng)
    for h in holders:
        one_rng = CryptoRng.from_seed(n, purpose="share_of")
        mine = shamir.share_of(secrets, holders=holders, threshold=t, rng=one_rng, holder=h)
        assert mine == [full[0][h], full[1][h]]
        assert (
            one_rng.bytes(16)
            == CryptoRng.from_seed(n, purpose="share_of").bytes(16 + 2 * 48 * (t - 1))[-16:]
        )  # the generator advanced exactly as split advanced it
    with pytest.raises(ConfigError):
        shamir.share_of(secrets, holders=holders, threshold=t, rng=full_rng, holder=0)
