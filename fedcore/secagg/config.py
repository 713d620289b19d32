"""Settings of one SecAgg round, shared by the server and every client.

A :class:`SessionConfig` travels to each client in the first server message
(:class:`~fedcore.secagg.messages.AdvertiseRequest`), so a client rebuilt from the server's
messages learns it again. Every check raises :class:`~fedcore.errors.ConfigError` naming the
value given; the wire parser turns that into :class:`~fedcore.errors.InvalidMessage`.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass

import numpy as np

from fedcore.errors import ConfigError, InvalidMessage
from fedcore.secagg.wire import Reader, Writer

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
class SessionEncoding:
    """How a site turns its float update into ring elements: every parameter that changes what a
    site sends, bound into the session id (:func:`fedcore.secagg.session.session_id`), so a
    replayed or re-routed request cannot change it.

    ``clip``: each coordinate is clipped to [-clip, clip]. ``max_total_weight``: a bound on the
    sum of the sites' weights (the scale of the encoding). ``dp_clip_norm``: with site-level DP,
    the L2 norm each site clips its update to before masking (0: no site-level DP; every site then
    weighs its examples). ``count_unclipped``: with adaptive clipping, each site adds its bit
    ``1[norm <= C]`` as one more exact coordinate.
    """

    clip: float
    max_total_weight: int
    dp_clip_norm: float = 0.0
    count_unclipped: bool = False

    def check(self, bits: int) -> None:
        """Raise ConfigError unless the encoding fits the ring Z/2**bits."""
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"clip must be finite and > 0, got {self.clip}")
        if not 1 <= self.max_total_weight < 1 << (bits - 1):
            raise ConfigError(
                f"max_total_weight must be in 1..2**{bits - 1}-1, got {self.max_total_weight}"
            )
        if not (math.isfinite(self.dp_clip_norm) and self.dp_clip_norm >= 0):
            raise ConfigError(f"dp_clip_norm must be finite and >= 0, got {self.dp_clip_norm}")
        if self.count_unclipped and self.dp_clip_norm == 0:
            raise ConfigError("count_unclipped needs a dp_clip_norm > 0")


def write_encoding(w: Writer, encoding: SessionEncoding) -> Writer:
    """The encoding's fields, in the order the session id hashes them and the wire carries them."""
    w.raw(struct.pack("<d", encoding.clip)).u64(encoding.max_total_weight)
    return w.raw(struct.pack("<d", encoding.dp_clip_norm)).u8(int(encoding.count_unclipped))


def read_encoding(r: Reader) -> SessionEncoding:
    """Inverse of :func:`write_encoding`; raises InvalidMessage on malformed input."""
    clip = struct.unpack("<d", r.fixed(8))[0]
    max_total_weight = r.u64()
    dp_clip_norm = struct.unpack("<d", r.fixed(8))[0]
    flag = r.u8()
    if flag not in (0, 1):
        raise InvalidMessage(f"count_unclipped must be 0 or 1, got {flag}")
    return SessionEncoding(clip, max_total_weight, dp_clip_norm, bool(flag))


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """One round's public parameters.

    ``clients``: the sorted, distinct ids invited to the round. ``threshold``: the t of t-out-of-n
    Shamir sharing; also the fewest survivors a stage may end with. ``bits``: the ring Z/2**bits the
    inputs live in. ``length``: the input vector length. ``neighbors``: 0 for the complete graph
    (Bonawitz et al.), or an even k for the k-regular Harary graph of SecAgg+ (Bell et al.).
    ``encoding``: how sites encode a float update (:class:`SessionEncoding`); None for a session
    over raw ring vectors (the in-memory harness), where the caller supplies the integers.
    """

    round_id: bytes
    clients: tuple[int, ...]
    threshold: int
    length: int
    bits: int = 32
    neighbors: int = 0
    mode: Mode = Mode.SEMI_HONEST
    encoding: SessionEncoding | None = None

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
        if self.encoding is not None:
            if not isinstance(self.encoding, SessionEncoding):
                raise ConfigError(f"encoding must be a SessionEncoding, got {self.encoding!r}")
            self.encoding.check(self.bits)
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
