"""Server-side recovery: rebuild the secrets the survivors revealed, then strip the masks.

Theory of operation (Bonawitz et al., CCS 2017, figure 4, round 4, server side): for each client
v that sent its masked input (U3) the server rebuilds the self-mask seed b_v from t shares; for
each client v that shared keys but sent no input (U2 \\ U3) it rebuilds the mask private key s_v,
recomputes the seed s_{u,v} it agreed with every surviving neighbour u, and so the pairwise mask
that u added and that v's missing input will never cancel:

    z = sum_{u in U3} y_u - sum_{u in U3} PRG(b_u) - sum_{v dropped} sum_{u in U3 ∩ N(v)} ±PRG(s_uv)

Every rebuilt secret is checked before use (b_v against the commitment in v's advert, s_v against
its advertised public key), so a corrupted share shows as InvalidMessage, never as a wrong sum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedcore.crypto.agreement import AgreementKey, x25519_public
from fedcore.crypto.expand import add_keystreams
from fedcore.errors import InvalidMessage
from fedcore.secagg import shamir
from fedcore.secagg.errors import TooFewSurvivors
from fedcore.secagg.graph import NeighborGraph
from fedcore.secagg.messages import KeyAdvert
from fedcore.secagg.session import check_seed_commitment, pairwise_seed, self_mask_key


@dataclass(frozen=True, slots=True, eq=False)
class AggregateResult:
    """The sum modulo 2**bits of the survivors' inputs, and the survivors (U3)."""

    total: np.ndarray = field(repr=False)
    survivors: frozenset[int]


def rebuild(
    owner: int,
    shares: Mapping[int, int],
    *,
    threshold: int,
    what: str,
) -> bytes:
    """One secret from its revealed shares; TooFewSurvivors below the threshold."""
    if len(shares) < threshold:
        raise TooFewSurvivors(
            f"{len(shares)} shares of client {owner}'s {what}; the threshold is {threshold}"
        )
    return shamir.reconstruct(shares, threshold=threshold)


def rebuild_seed(
    owner: int, shares: Mapping[int, int], *, threshold: int, round_id: bytes, advert: KeyAdvert
) -> bytes:
    seed = rebuild(owner, shares, threshold=threshold, what="self-mask seed")
    check_seed_commitment(round_id, owner, seed, advert.seed_commitment)
    return seed


def rebuild_mask_key(
    owner: int, shares: Mapping[int, int], *, threshold: int, advert: KeyAdvert
) -> bytes:
    private = rebuild(owner, shares, threshold=threshold, what="mask key")
    if x25519_public(private) != advert.mask_public:
        raise InvalidMessage(f"rebuilt mask key of client {owner} does not match its advert")
    return private


def remove_masks(
    total: np.ndarray,
    *,
    seeds: Mapping[int, bytes],
    mask_keys: Mapping[int, bytes],
    graph: NeighborGraph,
    survivors: frozenset[int],
    adverts: Mapping[int, KeyAdvert],
    session_id: bytes,
    bits: int,
) -> None:
    """In place: subtract every survivor's self mask and undo the masks shared with dropouts.

    Every mask is derived first and then all are applied in one pass over ``total``.
    """
    adds: list[bytes] = []
    subtracts = [self_mask_key(seed, session_id) for seed in seeds.values()]
    for v, private in mask_keys.items():
        loaded = AgreementKey(private)
        for u in sorted(graph.neighbors(v) & survivors):
            s = pairwise_seed(loaded, adverts[u].mask_public, session_id, u, v)
            # u added +PRG(s_uv) when u < v and subtracted it when u > v: undo that.
            (subtracts if u < v else adds).append(s)
    add_keystreams(total, adds=adds, subtracts=subtracts)
    if bits not in (32, 64):
        total &= total.dtype.type((1 << bits) - 1)
