"""The rules an honest SecAgg client enforces itself, whatever the server says.

Each function checks one kind of server message against what the client knows, and raises:
RemoteProtocolError for a broken rule, InvalidMessage for a signature that does not verify,
TooFewSurvivors when fewer than t clients remain (then nothing is revealed), LocalProtocolError
for bad local input. None of them changes any state. Bonawitz et al. (CCS 2017) state these as the
checks of figure 4 ("if |U| < t, abort"; the disjointness of the alive and dropped sets, rounds 4
and 5) and section 6 (signed keys and the consistency check); the rule against both shares of one
peer is what keeps a server from rebuilding both b_u and s_u and so unmasking u's input alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedcore.crypto import signing
from fedcore.errors import LocalProtocolError, RemoteProtocolError
from fedcore.secagg.config import Mode, SessionConfig, ring_dtype
from fedcore.secagg.errors import TooFewSurvivors
from fedcore.secagg.graph import NeighborGraph, check_reveal
from fedcore.secagg.messages import ConsistencySignature, KeyAdvert, RingReveal
from fedcore.secagg.session import advert_signed_bytes


def checked_adverts(
    adverts: Iterable[KeyAdvert],
    *,
    config: SessionConfig,
    own: KeyAdvert | None,
    registry: Mapping[int, bytes] | None,
) -> dict[int, KeyAdvert]:
    """The advert set U1 by sender, after checking senders, rounds, key reuse and signatures."""
    by_sender: dict[int, KeyAdvert] = {}
    keys_seen: set[bytes] = set()
    for a in adverts:
        if a.sender in by_sender:
            raise RemoteProtocolError(f"two adverts from client {a.sender}")
        if a.sender not in config.clients:
            raise RemoteProtocolError(f"advert from client {a.sender}, who is not invited")
        if a.round_id != config.round_id:
            raise RemoteProtocolError(f"advert of client {a.sender} is bound to another round")
        for key in (a.enc_public, a.mask_public):
            if key in keys_seen:
                raise RemoteProtocolError(f"duplicate public key (advert of client {a.sender})")
            keys_seen.add(key)
        if config.mode is Mode.ACTIVE:
            verify_advert(a, registry or {})
        by_sender[a.sender] = a
    if own is None or by_sender.get(own.sender) != own:
        raise RemoteProtocolError("the advert set does not contain this client's own advert")
    if len(by_sender) < config.threshold:
        raise TooFewSurvivors(
            f"{len(by_sender)} clients advertised keys, threshold is {config.threshold}"
        )
    return by_sender


def checked_reveals(
    reveals: Iterable[RingReveal], *, adverts: Mapping[int, KeyAdvert], round_id: bytes
) -> dict[int, bytes]:
    """Every member's ring reveal by sender: exactly one per advert, each opening its commitment.

    A missing reveal is refused like a wrong one: a ring drawn without some member's reveal is a
    ring the server could have chosen (by dropping that member after seeing the others')."""
    out: dict[int, bytes] = {}
    for r in reveals:
        if r.sender in out:
            raise RemoteProtocolError(f"two ring reveals from client {r.sender}")
        advert = adverts.get(r.sender)
        if advert is None:
            raise RemoteProtocolError(f"ring reveal from client {r.sender}, who did not advertise")
        if r.round_id != round_id:
            raise RemoteProtocolError(f"ring reveal of client {r.sender} is for another round")
        check_reveal(round_id, r.sender, r.reveal, advert.seed_commitment)
        out[r.sender] = r.reveal
    missing = sorted(set(adverts) - set(out))
    if missing:
        raise RemoteProtocolError(f"no ring reveal from clients {missing[:5]}")
    return out


def verify_advert(advert: KeyAdvert, registry: Mapping[int, bytes]) -> None:
    """An ACTIVE-mode advert must carry a valid signature by the sender's registered site key."""
    site_key = registry.get(advert.sender)
    if site_key is None:
        raise RemoteProtocolError(f"client {advert.sender} has no key in the registry")
    if not advert.signature:
        raise RemoteProtocolError(f"advert of client {advert.sender} is not signed")
    signing.verify(site_key, advert.signature, advert_signed_bytes(advert))


def ring_input(vector: object, config: SessionConfig) -> np.ndarray:
    """A fresh ring-typed copy of the input vector; LocalProtocolError if it does not fit."""
    if not isinstance(vector, np.ndarray):
        raise LocalProtocolError(f"input must be a numpy array, got {type(vector).__name__}")
    if vector.shape != (config.length,):
        raise LocalProtocolError(f"input must have shape ({config.length},), got {vector.shape}")
    if vector.dtype.kind not in "ui":
        raise LocalProtocolError(f"input must hold integers, got dtype {vector.dtype}")
    # An unsigned type no wider than the ring cannot hold an out-of-range entry: skip the scan.
    narrow = vector.dtype.kind == "u" and 8 * vector.dtype.itemsize <= config.bits
    if not narrow and (int(vector.min()) < 0 or int(vector.max()) >> config.bits):
        raise LocalProtocolError(f"input entries must lie in [0, 2**{config.bits})")
    return np.array(vector, dtype=ring_dtype(config.bits), order="C", copy=True)


def check_survivors(
    alive: frozenset[int], *, me: int, graph: NeighborGraph, seen: frozenset[int], threshold: int
) -> None:
    """The alive set must contain this client, name no neighbour that never sent it shares, and
    leave at least t survivors overall and among this client's share holders."""
    if me not in alive:
        raise RemoteProtocolError(f"client {me} is missing from the alive set")
    claimed = (alive & graph.neighbors(me)) - seen
    if claimed:
        raise RemoteProtocolError(
            f"clients {sorted(claimed)[:5]} are listed alive but never sent this client shares"
        )
    if len(alive) < threshold:
        raise TooFewSurvivors(f"{len(alive)} survivors, threshold is {threshold}")
    holders_alive = len(alive & graph.holders(me))
    if holders_alive < threshold:
        raise TooFewSurvivors(
            f"{holders_alive} alive share holders around client {me}, threshold is {threshold}"
        )


def check_unmask_sets(
    alive: frozenset[int],
    dropped: frozenset[int],
    *,
    me: int,
    graph: NeighborGraph,
    seen: frozenset[int],
    unopened: frozenset[int] = frozenset(),
) -> None:
    """Alive and dropped must be disjoint (never both shares of one peer), and consistent with
    the shares this client received: every sender accounted for, no phantom dropped neighbour.
    ``seen`` counts every sender whose share arrived, ``unopened`` those among them whose share did
    not open: this client did not mask with them, so they can only be listed dropped."""
    both = alive & dropped
    if both:
        raise RemoteProtocolError(f"clients {sorted(both)[:5]} are listed both alive and dropped")
    revived = alive & unopened
    if revived:
        raise RemoteProtocolError(
            f"clients {sorted(revived)[:5]} are listed alive, but their shares did not open here"
        )
    phantom = dropped & (graph.neighbors(me) - seen)
    if phantom:
        raise RemoteProtocolError(
            f"clients listed dropped never sent this client shares: {sorted(phantom)[:5]}"
        )
    unaccounted = seen - alive - dropped
    if unaccounted:
        raise RemoteProtocolError(
            f"clients {sorted(unaccounted)[:5]} sent shares but are neither alive nor dropped"
        )


def check_consistency_signatures(
    signatures: Iterable[ConsistencySignature],
    *,
    alive: tuple[int, ...],
    signed_by_me: tuple[int, ...] | None,
    signed_bytes: bytes,
    registry: Mapping[int, bytes],
    threshold: int,
) -> None:
    """ACTIVE mode: the alive set is the one this client signed, with t valid signatures on it
    from distinct alive clients (Bonawitz et al., section 6, round 4)."""
    if alive != signed_by_me:
        raise RemoteProtocolError("the alive set differs from the survivor set this client signed")
    signers: set[int] = set()
    for s in signatures:
        if s.sender in signers:
            raise RemoteProtocolError(f"two consistency signatures from client {s.sender}")
        if s.sender not in alive:
            raise RemoteProtocolError(f"consistency signature from {s.sender}, who is not alive")
        site_key = registry.get(s.sender)
        if site_key is None:
            raise RemoteProtocolError(f"client {s.sender} has no key in the registry")
        signing.verify(site_key, s.signature, signed_bytes)
        signers.add(s.sender)
    if len(signers) < threshold:
        raise TooFewSurvivors(f"{len(signers)} consistency signatures, threshold is {threshold}")
