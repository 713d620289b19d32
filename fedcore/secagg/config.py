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


# The noise kinds a distributed-DP session may bind, by wire code (fedcore.privacy.distributed's
# DistributedNoise values; this module stays below fedcore.privacy, so they are named here).
DISTRIBUTED_NOISE = {1: "dgauss", 2: "skellam"}
_FLAG_COUNT_UNCLIPPED = 1
_FLAG_DISTRIBUTED = 2


@dataclass(frozen=True, slots=True)
class DistributedSession:
    """What a distributed-DP session binds (:mod:`fedcore.mechanisms.distributed`): the discrete
    ``noise`` each site adds (``"dgauss"`` or ``"skellam"``), the scale ``gamma``, one site's
    noise share ``site_noise`` (grid units: sigma, or Skellam's variance), the conditional
    rounding's ``beta``, the fewest survivors a site unmasks with (``min_survivors``, the noise
    target's floor) and the ``colluders`` the server assumed add no noise. The L2 clip norm is the
    encoding's ``dp_clip_norm``. A site recomputes its privacy charge from these values and its
    own view of the round, so a server that lowers the noise makes it charge more, never less.
    """

    noise: str
    gamma: float
    site_noise: float
    beta: float
    min_survivors: int
    colluders: int

    def check(self) -> None:
        """Raise ConfigError for a value no distributed-DP round can have."""
        if self.noise not in DISTRIBUTED_NOISE.values():
            raise ConfigError(f"distributed noise must be dgauss or skellam, got {self.noise!r}")
        for name in ("gamma", "site_noise"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"distributed {name} must be finite and > 0, got {value!r}")
        if not (math.isfinite(self.beta) and 0 <= self.beta < 1):
            raise ConfigError(f"distributed beta must be in [0, 1), got {self.beta!r}")
        if not 1 <= self.min_survivors <= MAX_CLIENTS:
            raise ConfigError(
                f"min_survivors must be in 1..{MAX_CLIENTS}, got {self.min_survivors}"
            )
        if not 0 <= self.colluders < self.min_survivors:
            raise ConfigError(
                f"colluders must be in 0..min_survivors - 1 = {self.min_survivors - 1}, "
                f"got {self.colluders}"
            )


@dataclass(frozen=True, slots=True)
class SessionEncoding:
    """How a site turns its float update into ring elements: every parameter that changes what a
    site sends, bound into the session id (:func:`fedcore.secagg.session.session_id`), so a
    replayed or re-routed request cannot change it.

    ``clip``: each coordinate is clipped to [-clip, clip]. ``max_total_weight``: a bound on the
    sum of the sites' weights (the scale of the encoding). ``dp_clip_norm``: with site-level DP,
    the L2 norm each site clips its update to before masking (0: no site-level DP; every site then
    weighs its examples). ``count_unclipped``: with adaptive clipping, each site adds its bit
    ``1[norm <= C]`` as one more exact coordinate. ``distributed``: under distributed DP, the
    noise parameters every site applies (:class:`DistributedSession`; ``dp_clip_norm`` is then its
    L2 clip norm); None otherwise, and such a session's bytes are those it always had.
    """

    clip: float
    max_total_weight: int
    dp_clip_norm: float = 0.0
    count_unclipped: bool = False
    distributed: DistributedSession | None = None

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
        if self.distributed is not None:
            if not isinstance(self.distributed, DistributedSession):
                raise ConfigError(
                    f"distributed must be a DistributedSession, got {self.distributed!r}"
                )
            self.distributed.check()
            if self.dp_clip_norm == 0 or self.count_unclipped:
                raise ConfigError(
                    "a distributed-DP session needs a dp_clip_norm > 0 and no unclipped count"
                )


def write_encoding(w: Writer, encoding: SessionEncoding) -> Writer:
    """The encoding's fields, in the order the session id hashes them and the wire carries them.

    The last byte of the fixed part is a flags byte: bit 0 the unclipped count, bit 1 a
    distributed section follows (so a session without one keeps the bytes it always had)."""
    w.raw(struct.pack("<d", encoding.clip)).u64(encoding.max_total_weight)
    flags = int(encoding.count_unclipped) * _FLAG_COUNT_UNCLIPPED
    flags |= _FLAG_DISTRIBUTED if encoding.distributed is not None else 0
    w.raw(struct.pack("<d", encoding.dp_clip_norm)).u8(flags)
    d = encoding.distributed
    if d is None:
        return w
    code = next(k for k, v in DISTRIBUTED_NOISE.items() if v == d.noise)
    w.u8(code).raw(struct.pack("<ddd", d.gamma, d.site_noise, d.beta))
    return w.u32(d.min_survivors).u32(d.colluders)


def read_encoding(r: Reader) -> SessionEncoding:
    """Inverse of :func:`write_encoding`; raises InvalidMessage on malformed input."""
    clip = struct.unpack("<d", r.fixed(8))[0]
    max_total_weight = r.u64()
    dp_clip_norm = struct.unpack("<d", r.fixed(8))[0]
    flags = r.u8()
    if flags & ~(_FLAG_COUNT_UNCLIPPED | _FLAG_DISTRIBUTED):
        raise InvalidMessage(f"unknown encoding flags {flags:#04x}")
    distributed = None
    if flags & _FLAG_DISTRIBUTED:
        code = r.u8()
        if code not in DISTRIBUTED_NOISE:
            raise InvalidMessage(f"unknown distributed noise code {code}")
        gamma, site_noise, beta = struct.unpack("<ddd", r.fixed(24))
        distributed = DistributedSession(
            DISTRIBUTED_NOISE[code], gamma, site_noise, beta, r.u32(), r.u32()
        )
    return SessionEncoding(
        clip,
        max_total_weight,
        dp_clip_norm,
        bool(flags & _FLAG_COUNT_UNCLIPPED),
        distributed,
    )


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
            floor = self.min_survivors
            if floor is not None and floor > n:
                raise ConfigError(f"min_survivors {floor} is above the {n} clients of the round")
        holders = self.share_holders(n)
        if not 2 <= self.threshold <= holders:
            raise ConfigError(
                f"threshold must be in 2..{holders} (the share holders of a client), "
                f"got {self.threshold}"
            )

    @property
    def complete(self) -> bool:
        return self.neighbors == 0

    @property
    def distributed(self) -> DistributedSession | None:
        """The distributed-DP section the session binds, if any."""
        return None if self.encoding is None else self.encoding.distributed

    @property
    def min_survivors(self) -> int | None:
        """The fewest survivors a site unmasks with under distributed DP (None: no such floor)."""
        d = self.distributed
        return None if d is None else d.min_survivors

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
