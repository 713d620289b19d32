"""Server-side recovery: rebuild the secrets the survivors revealed, then strip the masks.

Theory of operation (Bonawitz et al., CCS 2017, figure 4, round 4, server side): for each client
v that sent its masked input (U3) the server rebuilds the self-mask seed b_v from t shares; for
each client v that shared keys but sent no input (U2 \\ U3) it rebuilds the mask private key s_v,
recomputes the seed s_{u,v} it agreed with every surviving neighbour u, and so the pairwise mask
that u added and that v's missing input will never cancel:

    z = sum_{u in U3} y_u - sum_{u in U3} PRG(b_u) - sum_{v dropped} sum_{u in U3 ∩ N(v)} ±PRG(s_uv)

Every rebuilt secret is checked before use (b_v against the commitment in v's advert, through its
ring reveal, :func:`fedcore.secagg.graph.ring_reveal`; s_v, which clients share in its canonical
clamped form, :func:`fedcore.secagg.client_keys.clamped`, against its exact bytes: that form and
the advertised public key), so a wrong share never gives a wrong sum. While enough good shares
remain, the secret is rebuilt anyway and, where the shares leave no doubt, the holders whose
shares do not fit are named (:func:`fedcore.secagg.shamir.reconstruct_checked`); only when no t
shares rebuild a secret that passes its check does recovery fail (InvalidMessage).

A neighbour u that could not open v's sealed share (``unopened``) did not mask with v and holds no
share of v: for the pair (u, v), v counts as dropped. Masks are removed only for the pairs that were
masked: v's pairwise masks with the survivors that did not report it.

:class:`Recovery` is the unmask stage of one round on the server: it knows, once U3 is fixed, which
shares each survivor must reveal, refuses to start the stage unless every needed secret has t
holders among those asked (TooFewSurvivors, before anything is revealed), collects the shares, and
finally rebuilds the secrets and unmasks the sum.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedcore.crypto.agreement import AgreementKey, x25519_public
from fedcore.crypto.expand import add_keystreams
from fedcore.errors import InvalidMessage, RemoteProtocolError
from fedcore.secagg import shamir
from fedcore.secagg.client_keys import clamped
from fedcore.secagg.errors import TooFewSurvivors
from fedcore.secagg.graph import NeighborGraph, ring_reveal
from fedcore.secagg.messages import KeyAdvert, ShareValue, UnmaskShares
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
        # The exact bytes: clients share the canonical (clamped) scalar, and X25519 maps distinct
        # canonical scalars to distinct public keys (up to a negligible set), while 2**5 raw
        # strings share each public key.
        if private != clamped(private) or x25519_public(private) != advert.mask_public:
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


class Recovery:
    """The server's unmask stage of one round, from the moment U3 is fixed.

    ``u2``: the clients that shared keys; ``u3``: the survivors (sent a masked input and were
    reported by nobody); ``unopened_by``: client -> the neighbours its sealed share failed at (they
    hold no share of it and did not mask with it). Nothing here is secret until :meth:`take`.
    """

    def __init__(
        self,
        *,
        threshold: int,
        round_id: bytes,
        graph: NeighborGraph,
        adverts: Mapping[int, KeyAdvert],
        session_id: bytes,
        bits: int,
        u2: frozenset[int],
        u3: frozenset[int],
        unopened_by: Mapping[int, Collection[int]],
    ) -> None:
        self._t, self._round_id, self._graph = threshold, round_id, graph
        self._adverts, self._session_id, self._bits = adverts, session_id, bits
        self._u2, self._u3 = u2, u3
        self._unopened_by = {v: frozenset(us) for v, us in unopened_by.items()}
        self.seed_shares: dict[int, dict[int, int]] = {}  # owner -> holder -> share
        self.key_shares: dict[int, dict[int, int]] = {}
        self.culprits: dict[int, str] = {}

    @property
    def dropped(self) -> frozenset[int]:
        return self._u2 - self._u3

    def _masked_with(self, v: int) -> frozenset[int]:
        """The survivors that masked with dropped client v (those its share opened at)."""
        return (self._graph.neighbors(v) & self._u3) - self._unopened_by.get(v, frozenset())

    def _require(self, count: int, what: str) -> None:
        if count < self._t:
            raise TooFewSurvivors(f"{count} {what}; the threshold is {self._t}")

    def check_recoverable(self, responders: frozenset[int]) -> None:
        """Before anyone unmasks: every secret needed has t holders among ``responders``.
        Raises TooFewSurvivors otherwise; nothing changes."""
        self._require(len(self._u3), "clients sent masked inputs")
        for v in self._u3:
            alive = self._graph.holders(v) & responders
            self._require(len(alive), f"alive holders of client {v}'s seed")
        for v in self.dropped:
            if self._masked_with(v):
                holders = (self._graph.neighbors(v) & responders) - self._unopened_by.get(v, set())
                self._require(len(holders), f"alive holders of client {v}'s mask key")

    def take(self, sender: int, message: UnmaskShares) -> None:
        """Record ``sender``'s revealed shares; RemoteProtocolError / InvalidMessage (and nothing
        recorded) unless it revealed exactly the shares it holds of the secrets needed."""
        # The graph is undirected: sender holds v's shares iff v is among sender's holders, and
        # its share opened there (the sender reported those that did not).
        want_seed = self._u3 & self._graph.holders(sender)
        want_key = {
            v
            for v in self.dropped & self._graph.neighbors(sender)
            if sender not in self._unopened_by.get(v, ())
        }
        _check_owners(sender, message.seed_shares, want_seed, "seed")
        _check_owners(sender, message.key_shares, want_key, "key")
        for s in (*message.seed_shares, *message.key_shares):
            if not 0 <= s.value < shamir.PRIME:
                raise InvalidMessage(f"share from client {sender} is not a field element")
        for s in message.seed_shares:
            self.seed_shares.setdefault(s.owner, {})[sender] = s.value
        for s in message.key_shares:
            self.key_shares.setdefault(s.owner, {})[sender] = s.value

    def finish(self, total: np.ndarray, responders: frozenset[int]) -> AggregateResult:
        """Rebuild every needed secret from the ``responders``' shares and unmask ``total`` in
        place. Wrong shares are decoded around and their holders named in :attr:`culprits`.
        Raises TooFewSurvivors / InvalidMessage when some secret cannot be rebuilt."""
        seeds: dict[int, bytes] = {}
        for v in sorted(self._u3):
            seeds[v], bad = rebuild_seed(
                v,
                _revealed(self.seed_shares, v, responders),
                threshold=self._t,
                round_id=self._round_id,
                advert=self._adverts[v],
                suspects=self.culprits,
            )
            self._blame(bad, v, "self-mask seed")
        mask_keys: dict[int, bytes] = {}
        for v in sorted(self.dropped):
            if not self._masked_with(v):
                continue  # no survivor masked with v
            mask_keys[v], bad = rebuild_mask_key(
                v,
                _revealed(self.key_shares, v, responders),
                threshold=self._t,
                advert=self._adverts[v],
                suspects=self.culprits,
            )
            self._blame(bad, v, "mask key")
        remove_masks(
            total,
            seeds=seeds,
            mask_keys=mask_keys,
            graph=self._graph,
            survivors=self._u3,
            adverts=self._adverts,
            session_id=self._session_id,
            bits=self._bits,
            unmasked_pairs=self._unopened_by,
        )
        total.flags.writeable = False
        return AggregateResult(total, self._u3)

    def _blame(self, found: frozenset[int], v: int, what: str) -> None:
        for h in found:
            self.culprits.setdefault(
                h, f"revealed a share of client {v}'s {what} that does not fit the others"
            )


def _revealed(
    store: Mapping[int, Mapping[int, int]], owner: int, responders: frozenset[int]
) -> dict[int, int]:
    return {h: y for h, y in store.get(owner, {}).items() if h in responders}


def _check_owners(
    sender: int, shares: tuple[ShareValue, ...], wanted: Collection[int], what: str
) -> None:
    owners = [s.owner for s in shares]
    if sorted(owners) != sorted(wanted) or len(set(owners)) != len(owners):
        raise RemoteProtocolError(f"client {sender} revealed the wrong set of {what} shares")
