"""A client's last two stages: it signs the survivor set (ACTIVE mode) and reveals its shares.

Theory of operation (Bonawitz et al., CCS 2017, figure 4, rounds 3 and 4, and section 6). After
its masked input, client u holds its own shares, the shares its neighbours sent it, and the
senders whose share did not open (:class:`Holdings`). Shown the survivor set U3, it checks the set
against what it holds, the threshold and its floors (:mod:`fedcore.secagg.rules`,
:class:`~fedcore.secagg.floors.Floors`) and, under distributed DP, the session's survivor floor
(:func:`~fedcore.secagg.floors.check_noise_floor`: fewer survivors than ``min_survivors`` would
release a sum with less noise than the target, so nothing is revealed); in ACTIVE mode it signs U3, and before unmasking it
requires t valid signatures on the very set it signed. Only then does it reveal, for each alive
peer, its share of b_v and, for each dropped peer, its share of s_v: never both for one peer.
Nothing here changes any state; every refusal raises (RemoteProtocolError, InvalidMessage,
TooFewSurvivors).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedcore.crypto import signing
from fedcore.errors import RemoteProtocolError
from fedcore.secagg import rules
from fedcore.secagg.config import Mode, SessionConfig
from fedcore.secagg.floors import Floors, check_noise_floor
from fedcore.secagg.graph import NeighborGraph
from fedcore.secagg.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    ShareValue,
    UnmaskRequest,
    UnmaskShares,
)
from fedcore.secagg.session import survivors_signed_bytes


@dataclass(frozen=True, slots=True)
class Holdings:
    """What client ``me`` holds once its masked input is sent: the session, its own (seed share,
    key share), the opened shares by sender, and the senders whose sealed share did not open."""

    me: int
    config: SessionConfig
    graph: NeighborGraph
    session_id: bytes
    own: tuple[int, int]
    received: Mapping[int, tuple[int, int]]
    unopened: frozenset[int]

    def ids(self, ids: tuple[int, ...], what: str) -> frozenset[int]:
        """``ids`` as a set; RemoteProtocolError unless sorted, distinct and in the session."""
        if list(ids) != sorted(set(ids)):
            raise RemoteProtocolError(f"{what} must be sorted and distinct")
        unknown = [i for i in ids if i not in self.graph]
        if unknown:
            raise RemoteProtocolError(f"{what} names clients outside the session: {unknown[:5]}")
        return frozenset(ids)

    def check_survivors(self, alive: frozenset[int], floors: Floors) -> None:
        """U3 against the shares received, the threshold and the floors (on the survivors)."""
        floors.check_participants(len(alive), what="sites survived to the masked input")
        check_noise_floor(self.config, len(alive))
        rules.check_survivors(
            alive,
            me=self.me,
            graph=self.graph,
            seen=frozenset(self.received),
            threshold=self.config.threshold,
        )


def sign_survivors(
    message: ConsistencyRequest, held: Holdings, *, floors: Floors, signing_key: bytes
) -> ConsistencySignature:
    """ACTIVE mode, round 3: the signature on U3, after every check of it."""
    held.check_survivors(held.ids(message.survivors, "survivor set"), floors)
    signed = survivors_signed_bytes(held.session_id, message.survivors)
    signature = signing.sign(signing_key, signed)
    return ConsistencySignature(held.me, held.config.round_id, signature)


def unmask_answer(
    message: UnmaskRequest,
    held: Holdings,
    *,
    floors: Floors,
    signed_by_me: tuple[int, ...] | None,
    registry: Mapping[int, bytes] | None,
) -> UnmaskShares:
    """Round 4: the shares of b_v for alive v and of s_v for dropped v, after every check.

    ``signed_by_me``: the survivor set this client signed (ACTIVE mode); ``registry``: the site
    keys the consistency signatures are checked against (ACTIVE mode)."""
    alive = held.ids(message.alive, "alive set")
    dropped = held.ids(message.dropped, "dropped set")
    seen = frozenset(held.received)
    rules.check_unmask_sets(
        alive,
        dropped,
        me=held.me,
        graph=held.graph,
        seen=seen | held.unopened,
        unopened=held.unopened,
    )
    held.check_survivors(alive, floors)
    if held.config.mode is Mode.ACTIVE:
        rules.check_consistency_signatures(
            message.signatures,
            alive=message.alive,
            signed_by_me=signed_by_me,
            signed_bytes=survivors_signed_bytes(held.session_id, message.alive),
            registry=registry or {},
            threshold=held.config.threshold,
        )
    seed_shares = [ShareValue(held.me, held.own[0])]
    seed_shares += [ShareValue(v, held.received[v][0]) for v in sorted(alive & seen)]
    key_shares = [ShareValue(v, held.received[v][1]) for v in sorted(dropped & seen)]
    seed_shares.sort(key=lambda s: s.owner)
    return UnmaskShares(held.me, held.config.round_id, tuple(seed_shares), tuple(key_shares))
