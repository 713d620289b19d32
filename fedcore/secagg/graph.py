"""Who masks with whom and who holds whose shares: the complete graph or a random Harary graph.

Theory of operation: classic SecAgg (Bonawitz et al., CCS 2017) pairs every client with every
other one, so each client's work grows with n. SecAgg+ (Bell et al., "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020, section 3) pairs each client only with its
k neighbours in a k-regular graph; with the clients placed on a ring in a uniformly random order and
each joined to the k/2 nearest on either side (a Harary graph H_{k,n}), the honest survivors stay
connected with overwhelming probability when k is chosen by :mod:`fedcore.secagg.params` (section
4.2, and Google FCP's ``SecretSharingHararyGraph``). Each client also holds one share of its own
secrets, so k + 1 clients hold shares of each secret.

The ring order is a Fisher-Yates shuffle driven by an AES-CTR generator keyed from the session id,
which is a hash of every advertised key: anyone can recompute the graph, so a client checks its
neighbour set itself instead of trusting the server, and nobody chooses the permutation (a server
would have to grind keys of clients it controls to bias it, which the session-id hash defeats up to
the 40-bit statistical margin of the parameter choice).
"""

from __future__ import annotations

from collections.abc import Iterable

from fedcore.crypto.agreement import derive_key
from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError


class NeighborGraph:
    """An undirected graph over the clients of a session. Immutable after construction."""

    __slots__ = ("members", "degree", "ring", "_position", "_cache")

    def __init__(self, members: Iterable[int], *, neighbors: int, session_id: bytes) -> None:
        ids = tuple(sorted(set(members)))
        if neighbors < 0 or neighbors % 2:
            raise ConfigError(f"neighbors must be 0 (complete) or even, got {neighbors}")
        self.members = ids
        # A k at least n - 1 joins everyone: that is the complete graph.
        self.degree = 0 if neighbors == 0 or neighbors >= len(ids) - 1 else neighbors
        self.ring = ids if self.degree == 0 else _shuffled(ids, session_id)
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


def _shuffled(ids: tuple[int, ...], session_id: bytes) -> tuple[int, ...]:
    """Fisher-Yates (Knuth, TAOCP vol. 2, Algorithm 3.4.2P) with unbiased draws by rejection."""
    rng = CryptoRng(derive_key(session_id, salt=b"fedcore/secagg/v1", info=b"neighbour-ring"))
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
