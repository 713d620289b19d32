"""Server-side recovery: rebuild the secrets the survivors revealed, then strip the masks.

Theory of operation (Bonawitz et al., CCS 2017, figure 4, round 4, server side): for each client
v that sent its masked input (U3) the server rebuilds the self-mask seed b_v from t shares; for
each client v that shared keys but sent no input (U2 \\ U3) it rebuilds the mask private key s_v,
recomputes the seed s_{u,v} it agreed with every surviving neighbour u, and so the pairwise mask
that u added and that v's missing input will never cancel:

    z = sum_{u in U3} y_u - sum_{u in U3} PRG(b_u) - sum_{v dropped} sum_{u in U3 ∩ N(v)} ±PRG(s_uv)

Every rebuilt secret is checked before use (b_v against the commitment in v's advert, through its
ring reveal, :func:`fedcore.secagg.graph.ring_reveal`; s_v against its advertised public key), so a
wrong share never gives a wrong sum. While enough good shares remain, the secret is rebuilt
anyway and the holders whose shares do not fit are named (:func:`fedcore.secagg.shamir.
reconstruct_checked`); only when no t shares rebuild a secret that passes its check does recovery
fail (InvalidMessage).

A neighbour u that could not open v's sealed share (``unopened``) did not mask with v and holds no
share of v: for the pair (u, v), v counts as dropped. Masks are removed only for the pairs that were
masked: v's pairwise masks with the survivors that did not report it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedcore.crypto.agreement import AgreementKey, x25519_public
from fedcore.crypto.expand import add_keystreams
from fedcore.errors import InvalidMessage
from fedcore.secagg import shamir
from fedcore.secagg.errors import TooFewSurvivors
from fedcore.secagg.graph import NeighborGraph, ring_reveal
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
    check: Callable[[bytes], None],
    suspects: Collection[int] = (),
) -> tuple[bytes, frozenset[int]]:
    """One secret from its revealed shares, and the holders whose shares do not fit it.

    ``suspects``: holders already caught with a wrong share; their shares are tried last. Raises
    TooFewSurvivors below the threshold, InvalidMessage when no ``threshold`` shares rebuild a
    secret that passes ``check``.
    """
    if len(shares) < threshold:
        raise TooFewSurvivors(
            f"{len(shares)} shares of client {owner}'s {what}; the threshold is {threshold}"
        )
    trusted = {h: y for h, y in shares.items() if h not in suspects}
    if suspects and len(trusted) >= threshold:
        try:
            return shamir.reconstruct_checked(trusted, threshold=threshold, check=check)
        except InvalidMessage:
            pass
    try:
        return shamir.reconstruct_checked(shares, threshold=threshold, check=check)
    except InvalidMessage as exc:
        raise InvalidMessage(
            f"the {len(shares)} revealed shares of client {owner}'s {what} do not rebuild it "
            f"(holders {sorted(shares)[:8]}): {exc}"
        ) from exc


def rebuild_seed(
    owner: int,
    shares: Mapping[int, int],
    *,
    threshold: int,
    round_id: bytes,
    advert: KeyAdvert,
    suspects: Collection[int] = (),
) -> tuple[bytes, frozenset[int]]:
    def check(seed: bytes) -> None:
        reveal = ring_reveal(round_id, owner, seed)
        check_seed_commitment(round_id, owner, reveal, advert.seed_commitment)

    return rebuild(
        owner, shares, threshold=threshold, what="self-mask seed", check=check, suspects=suspects
    )


def rebuild_mask_key(
    owner: int,
    shares: Mapping[int, int],
    *,
    threshold: int,
    advert: KeyAdvert,
    suspects: Collection[int] = (),
) -> tuple[bytes, frozenset[int]]:
    def check(private: bytes) -> None:
        if x25519_public(private) != advert.mask_public:
            raise InvalidMessage(f"rebuilt mask key of client {owner} does not match its advert")

    return rebuild(
        owner, shares, threshold=threshold, what="mask key", check=check, suspects=suspects
    )


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
    unmasked_pairs: Mapping[int, Collection[int]] | None = None,
) -> None:
    """In place: subtract every survivor's self mask and undo the masks shared with dropouts.

    ``unmasked_pairs``: dropped client -> survivors that did not mask with it (its sealed share
    did not open there). Every mask is derived first and then all are applied in one pass.
    """
    adds: list[bytes] = []
    subtracts = [self_mask_key(seed, session_id) for seed in seeds.values()]
    skip = unmasked_pairs or {}
    for v, private in mask_keys.items():
        loaded = AgreementKey(private)
        for u in sorted((graph.neighbors(v) & survivors) - set(skip.get(v, ()))):
            s = pairwise_seed(loaded, adverts[u].mask_public, session_id, u, v)
            # u added +PRG(s_uv) when u < v and subtracted it when u > v: undo that.
            (subtracts if u < v else adds).append(s)
    add_keystreams(total, adds=adds, subtracts=subtracts)
    if bits not in (32, 64):
        total &= total.dtype.type((1 << bits) - 1)
