"""Settings of one SecAgg round, shared by the server and every client.

A :class:`SessionConfig` travels to each client in the first server message
(:class:`~fedcore.secagg.messages.AdvertiseRequest`), so a client rebuilt from the server's
messages learns it again. Every check raises :class:`~fedcore.errors.ConfigError` naming the
value given; the wire parser turns that into :class:`~fedcore.errors.InvalidMessage`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from fedcore.errors import ConfigError

MIN_BITS = 8
MAX_BITS = 62
MAX_CLIENTS = 1 << 16
MAX_CLIENT_ID = (1 << 64) - 2  # Flower node ids are 64-bit; id + 1 must stay a u64
MAX_LENGTH = 1 << 31
MAX_ROUND_ID_BYTES = 64


class Mode(enum.Enum):
    """Threat model; ``ACTIVE`` adds signed adverts and the consistency check (Bonawitz, sec. 6)."""

    SEMI_HONEST = 1
    ACTIVE = 2


class Stage(enum.Enum):
    """The stages of a round, in order; the values are the names :func:`aggregate_in_memory` takes.

    REVEAL runs for a sparse graph only, CONSISTENCY in ``ACTIVE`` mode only."""

    ADVERTISE = "advertise"
    REVEAL = "reveal"
    SHARE = "share"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"


def ring_dtype(bits: int) -> type[np.unsignedinteger]:
    """The numpy word type that holds the ring Z/2**bits: uint32 up to 32 bits, uint64 above."""
    return np.uint32 if bits <= 32 else np.uint64


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """One round's public parameters.

    ``clients``: the sorted, distinct ids invited to the round. ``threshold``: the t of t-out-of-n
    Shamir sharing; also the fewest survivors a stage may end with. ``bits``: the ring Z/2**bits the
    inputs live in. ``length``: the input vector length. ``neighbors``: 0 for the complete graph
    (Bonawitz et al.), or an even k for the k-regular Harary graph of SecAgg+ (Bell et al.).
    """

    round_id: bytes
    clients: tuple[int, ...]
    threshold: int
    length: int
    bits: int = 32
    neighbors: int = 0
    mode: Mode = Mode.SEMI_HONEST

    def __post_init__(self) -> None:
        if not 1 <= len(self.round_id) <= MAX_ROUND_ID_BYTES:
            raise ConfigError(
                f"round_id must be 1..{MAX_ROUND_ID_BYTES} bytes, got {len(self.round_id)}"
            )
        n = len(self.clients)
        if not 2 <= n <= MAX_CLIENTS:
            raise ConfigError(f"a round needs 2..{MAX_CLIENTS} clients, got {n}")
        if any(not 0 <= c <= MAX_CLIENT_ID for c in self.clients):
            raise ConfigError(f"client ids must be in 0..2**64-2, got {self.clients}")
        if list(self.clients) != sorted(set(self.clients)):
            raise ConfigError("clients must be sorted and distinct")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}")
        if not 1 <= self.length <= MAX_LENGTH:
            raise ConfigError(f"length must be in 1..{MAX_LENGTH}, got {self.length}")
        if self.neighbors < 0 or self.neighbors % 2:
            raise ConfigError(
                f"neighbors must be 0 (complete) or an even k >= 2, got {self.neighbors}"
            )
        if not isinstance(self.mode, Mode):
            raise ConfigError(f"mode must be a Mode, got {self.mode!r}")
        holders = self.share_holders(n)
        if not 2 <= self.threshold <= holders:
            raise ConfigError(
                f"threshold must be in 2..{holders} (the share holders of a client), "
                f"got {self.threshold}"
            )

    @property
    def complete(self) -> bool:
        return self.neighbors == 0

    def share_holders(self, n: int) -> int:
        """How many clients (itself included) hold shares of one client's secrets among ``n``."""
        if self.neighbors == 0 or self.neighbors >= n - 1:
            return n
        return self.neighbors + 1


def default_threshold(n: int, *, neighbors: int = 0, mode: Mode = Mode.SEMI_HONEST) -> int:
    """A safe default t: a strict majority of the share holders (two thirds in ``ACTIVE`` mode).

    Bonawitz et al. (section 5, Theorem 6.3) need t > n/2 against a semi-honest server colluding
    with fewer than t clients, and t > 2n/3 against an active one; with the Harary graph the count
    is over one client's k + 1 share holders (Bell et al., section 4).
    """
    holders = n if neighbors == 0 or neighbors >= n - 1 else neighbors + 1
    if holders < 2:
        raise ConfigError(f"a round needs at least 2 clients, got {n}")
    t = (2 * holders) // 3 + 1 if mode is Mode.ACTIVE else holders // 2 + 1
    return max(2, min(t, holders))
