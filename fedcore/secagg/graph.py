"""Who masks with whom and who holds whose shares: the complete graph or a random Harary graph.

Theory of operation: classic SecAgg (Bonawitz et al., CCS 2017) pairs every client with every
other one, so each client's work grows with n. SecAgg+ (Bell et al., "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020, section 3) pairs each client only with its
k neighbours in a k-regular graph; with the clients placed on a ring in a uniformly random order and
each joined to the k/2 nearest on either side (a Harary graph H_{k,n}), the honest survivors stay
connected with overwhelming probability when k is chosen by :mod:`fedcore.secagg.params` (section
4.2, and Google FCP's ``SecretSharingHararyGraph``). Each client also holds one share of its own
secrets, so k + 1 clients hold shares of each secret.

Who draws the ring. The analysis of Bell et al. needs the ring order to be uniform *and
independent of the adversary's choices*. A ring keyed by a hash of every advertised key is not:
colluders who advertise last (a colluding server shows them the honest adverts first) re-draw
their keys until the hash puts them around a target, and then hold enough of the target's shares
(136 tries, under half a second, for four colluders around one target). A server-chosen seed is no
better against a colluding server. So the ring seed comes from a commit-reveal among all
participants (Blum's coin flipping over the phone, 1981, with n parties):

1. In its advert each client u commits to a reveal r_u = SHA-256("ring-reveal" | round | u | b_u),
   a one-way function of its self-mask seed b_u: the advert's seed commitment is
   SHA-256("seed-commitment" | round | u | r_u) (:func:`ring_reveal`). The commitment is hiding
   (b_u is 256 random bits) and binding (SHA-256 collision resistance), and it is the same field
   the server uses to check a rebuilt b_u, so the wire format and the key schedule are unchanged
   and r_u reveals nothing usable about b_u.
2. When the advertise stage closes, the advert set U1 is fixed; the server sends it to every
   member in a RevealRequest and each member answers with r_u (one extra exchange, for a sparse
   graph only: the complete graph has no ring to steer). Every client checks the advert set it is
   shown as in stage 1 and fixes its session there.
3. The ShareKeysRequest carries the reveals of *every* member of U1; each client checks each one
   against its commitment, and the ring seed is SHA-256("ring-seed" | round | (v, r_v) for v in
   U1) (:func:`ring_seed`). The ring shuffles the member ids only: keys do not enter it.

Why nobody can steer it: when the last colluder commits, every honest commitment is already fixed
and hides its reveal, so the colluders cannot compute the seed that any choice of theirs leads to;
re-drawing keys (without changing the commitment) does not move the ring at all, and re-drawing
the commitment moves it to a place that depends on honest reveals nobody has seen. After the
reveals, the server cannot reshape the ring by dropping members: the seed needs the reveal of
every member of U1 and the ring is over U1, so a member whose reveal is missing or wrong ends the
round (TooFewSurvivors, nothing secret has been shared yet) instead of being dropped, and the
server cannot add or remove anyone (each client fixed U1 at the reveal stage and refuses a changed
set). A member that drops after revealing keeps its place and is an ordinary dropout. What is left
to an adversary: a server (or a colluder, by withholding its reveal) can end the round and start
another, and get a fresh, independent ring per *round*, each try costing a whole round with new
commitments and showing in the run record; it cannot search rings inside one round.

Cost: a RevealRequest carries the adverts (as the ShareKeysRequest does), a RingReveal 32 bytes,
and the ShareKeysRequest 45 bytes more per member; nothing is computed but n hashes. The extra
exchange is the cost (about 1 s per 100 messages through Flower's simulation engine), so it runs
for a sparse graph only.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

from fedcore.crypto.agreement import derive_key
from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError, InvalidMessage
from fedcore.secagg.config import SessionConfig
from fedcore.secagg.session import DOMAIN, seed_commitment
from fedcore.secagg.wire import Writer


def sparse(config: SessionConfig) -> bool:
    """Whether the session's graph is a Harary ring over its invited clients (it then draws its
    ring by commit-reveal, which adds the reveal stage); False for the complete graph."""
    return config.neighbors != 0 and config.neighbors < len(config.clients) - 1


def ring_reveal(round_id: bytes, sender: int, seed: bytes) -> bytes:
    """r_u: what client ``sender`` reveals at the reveal stage, a one-way function of its
    self-mask seed; its advert's seed commitment is ``seed_commitment(round, sender, r_u)``."""
    w = Writer().raw(DOMAIN + b"ring-reveal").blob(round_id).u64(sender).raw(seed)
    return hashlib.sha256(w.getvalue()).digest()


def check_reveal(round_id: bytes, sender: int, reveal: bytes, commitment: bytes) -> None:
    """Raise InvalidMessage unless ``reveal`` opens the commitment of ``sender``'s advert."""
    if len(reveal) != 32 or not hmac.compare_digest(
        seed_commitment(round_id, sender, reveal), commitment
    ):
        raise InvalidMessage(f"ring reveal of client {sender} does not open its commitment")


def ring_seed(round_id: bytes, reveals: Mapping[int, bytes]) -> bytes:
    """The ring seed: a hash of the round and of every member's reveal, in member order."""
    w = Writer().raw(DOMAIN + b"ring-seed").blob(round_id).u32(len(reveals))
    for member in sorted(reveals):
        w.u64(member).raw(reveals[member])
    return hashlib.sha256(w.getvalue()).digest()


class NeighborGraph:
    """An undirected graph over the clients of a session. Immutable after construction."""

    __slots__ = ("members", "degree", "ring", "_position", "_cache")

    def __init__(self, members: Iterable[int], *, neighbors: int, seed: bytes) -> None:
        """``seed`` keys the ring's shuffle (:func:`ring_seed` for a sparse session)."""
        ids = tuple(sorted(set(members)))
        if neighbors < 0 or neighbors % 2:
            raise ConfigError(f"neighbors must be 0 (complete) or even, got {neighbors}")
        self.members = ids
        # A k at least n - 1 joins everyone: that is the complete graph.
        self.degree = 0 if neighbors == 0 or neighbors >= len(ids) - 1 else neighbors
        self.ring = ids if self.degree == 0 else _shuffled(ids, seed)
        self._position = {c: i for i, c in enumerate(self.ring)}
        self._cache: dict[int, frozenset[int]] = {}

    @property
    def complete(self) -> bool:
        return self.degree == 0

    def __contains__(self, client: object) -> bool:
        return client in self._position

    def neighbors(self, client: int) -> frozenset[int]:
        """The clients ``client`` masks with and shares with, itself excluded."""
        cached = self._cache.get(client)
        if cached is not None:
            return cached
        if client not in self._position:
            raise ConfigError(f"client {client} is not in the graph")
        if self.degree == 0:
            found = frozenset(self.members) - {client}
        else:
            m, pos, half = len(self.ring), self._position[client], self.degree // 2
            found = frozenset(self.ring[(pos + d) % m] for d in range(-half, half + 1) if d)
        self._cache[client] = found
        return found

    def holders(self, client: int) -> frozenset[int]:
        """The clients holding shares of ``client``'s secrets: its neighbours and itself."""
        return self.neighbors(client) | {client}


def _shuffled(ids: tuple[int, ...], seed: bytes) -> tuple[int, ...]:
    """Fisher-Yates (Knuth, TAOCP vol. 2, Algorithm 3.4.2P) with unbiased draws by rejection."""
    rng = CryptoRng(derive_key(seed, salt=b"fedcore/secagg/v1", info=b"neighbour-ring"))
    order = list(ids)
    for i in range(len(order) - 1, 0, -1):
        bound = i + 1
        limit = (1 << 64) - ((1 << 64) % bound)
        while True:
            word = int(rng.uint64(1)[0])
            if word < limit:
                break
        j = word % bound
        order[i], order[j] = order[j], order[i]
    return tuple(order)
