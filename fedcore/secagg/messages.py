"""The twelve SecAgg messages: frozen records that serialise to bytes and parse back.

Server to client: :class:`AdvertiseRequest`, :class:`RevealRequest`, :class:`ShareKeysRequest`,
:class:`MaskedInputRequest`, :class:`ConsistencyRequest`, :class:`UnmaskRequest`. Client to server:
:class:`KeyAdvert`, :class:`RingReveal`, :class:`EncryptedShares`, :class:`MaskedInput`,
:class:`ConsistencySignature`, :class:`UnmaskShares`. Stage by stage they follow Bonawitz et al.
(CCS 2017), figure 4 (rounds 0 to 4); the reveal stage between rounds 0 and 1 runs for a sparse
graph only (:mod:`fedcore.secagg.graph`: who draws the neighbour ring).

Wire format: ``VERSION`` (one byte), a tag byte naming the message type, then the fields in order
(little-endian integers, length-prefixed byte strings, see :mod:`fedcore.secagg.wire`). The
parsers check structure only (sizes, counts, ranges, trailing bytes) and raise
:class:`~fedcore.errors.InvalidMessage` for anything else; protocol rules (who may send what, to
whom, in which session) are the state machines' job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np

from fedcore.errors import ConfigError, InvalidMessage
from fedcore.secagg.config import (
    MAX_BITS,
    MIN_BITS,
    Mode,
    SessionConfig,
    read_encoding,
    ring_dtype,
    write_encoding,
)
from fedcore.secagg.wire import Reader, Writer

VERSION = 1
KEY_BYTES = 32
SIGNATURE_BYTES = 64
SHARE_BYTES = 33  # an element of the prime field of fedcore.secagg.shamir (p > 2**256)
MAX_CIPHERTEXT_BYTES = 1024
MAX_ROUND_ID = 64


# --------------------------------------------------------------------------- server -> client


@dataclass(frozen=True, slots=True)
class AdvertiseRequest:
    """Stage 0: the round's settings; asks the recipient for its public keys."""

    recipient: int
    config: SessionConfig

    @property
    def round_id(self) -> bytes:
        return self.config.round_id


@dataclass(frozen=True, slots=True)
class KeyAdvert:
    """Stage 0 answer: two X25519 public keys, a commitment to the self-mask seed, and (in
    ``ACTIVE`` mode) an Ed25519 signature over all of it by the site's registered key."""

    sender: int
    round_id: bytes
    enc_public: bytes
    mask_public: bytes
    seed_commitment: bytes
    signature: bytes = b""


@dataclass(frozen=True, slots=True)
class RevealRequest:
    """Stage 0b (sparse graph only): the advert set U1, now fixed; asks for the ring reveal."""

    recipient: int
    round_id: bytes
    adverts: tuple[KeyAdvert, ...]


@dataclass(frozen=True, slots=True)
class RingReveal:
    """Stage 0b answer: the value the sender committed to in its advert, opened."""

    sender: int
    round_id: bytes
    reveal: bytes


@dataclass(frozen=True, slots=True)
class ShareKeysRequest:
    """Stage 1: every advert the server accepted (the set U1), in sender order, and for a sparse
    graph every member's ring reveal (which fix the neighbour ring)."""

    recipient: int
    round_id: bytes
    adverts: tuple[KeyAdvert, ...]
    reveals: tuple[RingReveal, ...] = ()


@dataclass(frozen=True, slots=True)
class EncryptedShare:
    """A sealed pair of Shamir shares (self-mask seed, mask key) from ``sender`` to ``receiver``."""

    sender: int
    receiver: int
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class EncryptedShares:
    """Stage 1 answer: one :class:`EncryptedShare` per neighbour of the sender."""

    sender: int
    round_id: bytes
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True, slots=True)
class MaskedInputRequest:
    """Stage 2: the shares addressed to the recipient by the clients that answered stage 1 (U2)."""

    recipient: int
    round_id: bytes
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True, slots=True, eq=False)
class MaskedInput:
    """Stage 2 answer: the masked vector ``y_u`` in Z/2**bits (uint32 to 32 bits, else uint64),
    and ``unopened``: the neighbours whose sealed shares did not open here (the sender treated
    them as dropped: it holds no share of theirs and did not mask with them)."""

    sender: int
    round_id: bytes
    bits: int
    vector: np.ndarray = field(repr=False)
    unopened: tuple[int, ...] = ()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaskedInput):
            return NotImplemented
        return (
            (self.sender, self.round_id, self.bits, self.unopened)
            == (other.sender, other.round_id, other.bits, other.unopened)
            and self.vector.shape == other.vector.shape
            and bool(np.array_equal(self.vector, other.vector))
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class ConsistencyRequest:
    """Stage 3 (``ACTIVE`` mode): the survivor set U3 the recipient is asked to sign."""

    recipient: int
    round_id: bytes
    survivors: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ConsistencySignature:
    """Stage 3 answer: the sender's Ed25519 signature over (session, U3)."""

    sender: int
    round_id: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class UnmaskRequest:
    """Stage 4: which clients are alive (sent a masked input) and which dropped after sharing keys.

    In ``ACTIVE`` mode it carries at least ``threshold`` consistency signatures over ``alive``.
    """

    recipient: int
    round_id: bytes
    alive: tuple[int, ...]
    dropped: tuple[int, ...]
    signatures: tuple[ConsistencySignature, ...] = ()


@dataclass(frozen=True, slots=True)
class ShareValue:
    """A revealed Shamir share of ``owner``'s secret; the x-coordinate is the holder's."""

    owner: int
    value: int


@dataclass(frozen=True, slots=True)
class UnmaskShares:
    """Stage 4 answer: self-mask-seed shares of alive peers, mask-key shares of dropped ones."""

    sender: int
    round_id: bytes
    seed_shares: tuple[ShareValue, ...]
    key_shares: tuple[ShareValue, ...]


ServerMessage: TypeAlias = (
    AdvertiseRequest
    | RevealRequest
    | ShareKeysRequest
    | MaskedInputRequest
    | ConsistencyRequest
    | UnmaskRequest
)
ClientMessage: TypeAlias = (
    KeyAdvert | RingReveal | EncryptedShares | MaskedInput | ConsistencySignature | UnmaskShares
)
Message: TypeAlias = ServerMessage | ClientMessage

SERVER_MESSAGES: tuple[type, ...] = (
    AdvertiseRequest,
    RevealRequest,
    ShareKeysRequest,
    MaskedInputRequest,
    ConsistencyRequest,
    UnmaskRequest,
)
CLIENT_MESSAGES: tuple[type, ...] = (
    KeyAdvert,
    RingReveal,
    EncryptedShares,
    MaskedInput,
    ConsistencySignature,
    UnmaskShares,
)

_TAGS: dict[type, int] = {
    AdvertiseRequest: 0x01,
    ShareKeysRequest: 0x02,
    MaskedInputRequest: 0x03,
    ConsistencyRequest: 0x04,
    UnmaskRequest: 0x05,
    RevealRequest: 0x06,
    KeyAdvert: 0x11,
    EncryptedShares: 0x12,
    MaskedInput: 0x13,
    ConsistencySignature: 0x14,
    UnmaskShares: 0x15,
    RingReveal: 0x16,
}


# --------------------------------------------------------------------------- encoding


def _w_advert(w: Writer, m: KeyAdvert) -> None:
    w.u64(m.sender).blob(m.round_id)
    w.fixed(m.enc_public, KEY_BYTES).fixed(m.mask_public, KEY_BYTES)
    w.fixed(m.seed_commitment, KEY_BYTES).blob(m.signature)


def _w_share(w: Writer, s: EncryptedShare) -> None:
    w.u64(s.sender).u64(s.receiver).blob(s.ciphertext)


def _w_reveal(w: Writer, m: RingReveal) -> None:
    w.u64(m.sender).blob(m.round_id).fixed(m.reveal, KEY_BYTES)


def _w_signature(w: Writer, m: ConsistencySignature) -> None:
    w.u64(m.sender).blob(m.round_id).blob(m.signature)


def _w_values(w: Writer, values: tuple[ShareValue, ...]) -> None:
    w.u32(len(values))
    for v in values:
        w.u64(v.owner).fixed(v.value.to_bytes(SHARE_BYTES, "big"), SHARE_BYTES)


def encode(message: Message) -> bytes:
    """Serialise any SecAgg message. Raises ConfigError for a record that cannot be encoded."""
    try:
        tag = _TAGS[type(message)]
    except KeyError:
        raise ConfigError(f"not a SecAgg message: {type(message).__name__}") from None
    w = Writer().u8(VERSION).u8(tag)
    try:
        _encode_body(w, message)
    except (ValueError, OverflowError, AttributeError) as exc:
        raise ConfigError(f"cannot encode {type(message).__name__}: {exc}") from exc
    return w.getvalue()


def _encode_body(w: Writer, m: Message) -> None:
    if isinstance(m, AdvertiseRequest):
        c = m.config
        w.u64(m.recipient).blob(c.round_id).ids(c.clients)
        w.u32(c.threshold).u32(c.length).u8(c.bits).u32(c.neighbors).u8(c.mode.value)
        if c.encoding is not None:  # a trailer: raw-vector sessions keep their old bytes
            write_encoding(w, c.encoding)
    elif isinstance(m, KeyAdvert):
        _w_advert(w, m)
    elif isinstance(m, ShareKeysRequest | RevealRequest):
        w.u64(m.recipient).blob(m.round_id).u32(len(m.adverts))
        for a in m.adverts:
            _w_advert(w, a)
        if isinstance(m, ShareKeysRequest):
            w.u32(len(m.reveals))
            for rv in m.reveals:
                _w_reveal(w, rv)
    elif isinstance(m, RingReveal):
        _w_reveal(w, m)
    elif isinstance(m, EncryptedShares | MaskedInputRequest):
        head = m.sender if isinstance(m, EncryptedShares) else m.recipient
        w.u64(head).blob(m.round_id).u32(len(m.shares))
        for s in m.shares:
            _w_share(w, s)
    elif isinstance(m, MaskedInput):
        vec = np.ascontiguousarray(m.vector, dtype=np.dtype(ring_dtype(m.bits)).newbyteorder("<"))
        w.u64(m.sender).blob(m.round_id).u8(m.bits).ids(m.unopened)
        w.u32(len(vec)).raw(vec.data.cast("B"))
    elif isinstance(m, ConsistencyRequest):
        w.u64(m.recipient).blob(m.round_id).ids(m.survivors)
    elif isinstance(m, ConsistencySignature):
        _w_signature(w, m)
    elif isinstance(m, UnmaskRequest):
        w.u64(m.recipient).blob(m.round_id).ids(m.alive).ids(m.dropped).u32(len(m.signatures))
        for sig in m.signatures:
            _w_signature(w, sig)
    elif isinstance(m, UnmaskShares):
        w.u64(m.sender).blob(m.round_id)
        _w_values(w, m.seed_shares)
        _w_values(w, m.key_shares)


# --------------------------------------------------------------------------- parsing


def _r_round(r: Reader) -> bytes:
    rid = r.blob(MAX_ROUND_ID)
    if not rid:
        raise InvalidMessage("empty round id")
    return rid


def _r_advert(r: Reader) -> KeyAdvert:
    sender = r.u64()
    rid = _r_round(r)
    enc, mask, commit = r.fixed(KEY_BYTES), r.fixed(KEY_BYTES), r.fixed(KEY_BYTES)
    sig = r.blob(SIGNATURE_BYTES)
    if sig and len(sig) != SIGNATURE_BYTES:
        raise InvalidMessage(f"signature must be empty or {SIGNATURE_BYTES} bytes, got {len(sig)}")
    return KeyAdvert(sender, rid, enc, mask, commit, sig)


def _r_share(r: Reader) -> EncryptedShare:
    return EncryptedShare(r.u64(), r.u64(), r.blob(MAX_CIPHERTEXT_BYTES))


def _r_reveal(r: Reader) -> RingReveal:
    return RingReveal(r.u64(), _r_round(r), r.fixed(KEY_BYTES))


def _r_signature(r: Reader) -> ConsistencySignature:
    sender, rid, sig = r.u64(), _r_round(r), r.blob(SIGNATURE_BYTES)
    if len(sig) != SIGNATURE_BYTES:
        raise InvalidMessage(f"signature must be {SIGNATURE_BYTES} bytes, got {len(sig)}")
    return ConsistencySignature(sender, rid, sig)


def _r_values(r: Reader) -> tuple[ShareValue, ...]:
    n = r.count(8 + SHARE_BYTES)
    return tuple(ShareValue(r.u64(), int.from_bytes(r.fixed(SHARE_BYTES), "big")) for _ in range(n))


def _p_advertise_request(r: Reader) -> AdvertiseRequest:
    recipient, rid, clients = r.u64(), _r_round(r), r.ids()
    threshold, length, bits, neighbors, mode = r.u32(), r.u32(), r.u8(), r.u32(), r.u8()
    encoding = read_encoding(r) if r.remaining else None
    try:
        config = SessionConfig(
            round_id=rid,
            clients=clients,
            threshold=threshold,
            length=length,
            bits=bits,
            neighbors=neighbors,
            mode=Mode(mode),
            encoding=encoding,
        )
    except (ConfigError, ValueError) as exc:
        raise InvalidMessage(f"invalid session config: {exc}") from exc
    return AdvertiseRequest(recipient, config)


def _p_share_keys_request(r: Reader) -> ShareKeysRequest:
    recipient, rid = r.u64(), _r_round(r)
    n = r.count(8 + 4 + 1 + 3 * KEY_BYTES + 4)
    adverts = tuple(_r_advert(r) for _ in range(n))
    m = r.count(8 + 4 + 1 + KEY_BYTES)
    return ShareKeysRequest(recipient, rid, adverts, tuple(_r_reveal(r) for _ in range(m)))


def _p_reveal_request(r: Reader) -> RevealRequest:
    recipient, rid = r.u64(), _r_round(r)
    n = r.count(8 + 4 + 1 + 3 * KEY_BYTES + 4)
    return RevealRequest(recipient, rid, tuple(_r_advert(r) for _ in range(n)))


def _p_encrypted_shares(r: Reader) -> EncryptedShares:
    sender, rid = r.u64(), _r_round(r)
    n = r.count(20)
    return EncryptedShares(sender, rid, tuple(_r_share(r) for _ in range(n)))


def _p_masked_input_request(r: Reader) -> MaskedInputRequest:
    recipient, rid = r.u64(), _r_round(r)
    n = r.count(20)
    return MaskedInputRequest(recipient, rid, tuple(_r_share(r) for _ in range(n)))


def _p_masked_input(r: Reader) -> MaskedInput:
    sender, rid, bits = r.u64(), _r_round(r), r.u8()
    if not MIN_BITS <= bits <= MAX_BITS:
        raise InvalidMessage(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    unopened = r.ids()
    dtype = np.dtype(ring_dtype(bits)).newbyteorder("<")
    n = r.count(dtype.itemsize)
    # No copy on a little-endian machine: the vector is a read-only view of the message's bytes
    # (the server keeps it until the stage closes, and the transport holds those bytes anyway).
    vector = np.frombuffer(r.view(n * dtype.itemsize), dtype=dtype).astype(
        ring_dtype(bits), copy=False
    )
    if n and int(vector.max()) >> bits:
        raise InvalidMessage(f"masked input has an entry >= 2**{bits}")
    if vector.flags.writeable:
        vector.flags.writeable = False
    return MaskedInput(sender, rid, bits, vector, unopened)


def _p_consistency_request(r: Reader) -> ConsistencyRequest:
    return ConsistencyRequest(r.u64(), _r_round(r), r.ids())


def _p_unmask_request(r: Reader) -> UnmaskRequest:
    recipient, rid, alive, dropped = r.u64(), _r_round(r), r.ids(), r.ids()
    n = r.count(8 + 4 + 1 + 4 + SIGNATURE_BYTES)
    return UnmaskRequest(recipient, rid, alive, dropped, tuple(_r_signature(r) for _ in range(n)))


def _p_unmask_shares(r: Reader) -> UnmaskShares:
    sender, rid = r.u64(), _r_round(r)
    return UnmaskShares(sender, rid, _r_values(r), _r_values(r))


_PARSERS: dict[int, Callable[[Reader], Message]] = {
    0x01: _p_advertise_request,
    0x02: _p_share_keys_request,
    0x03: _p_masked_input_request,
    0x04: _p_consistency_request,
    0x05: _p_unmask_request,
    0x06: _p_reveal_request,
    0x11: _r_advert,
    0x12: _p_encrypted_shares,
    0x13: _p_masked_input,
    0x14: _r_signature,
    0x15: _p_unmask_shares,
    0x16: _r_reveal,
}


def decode(data: bytes) -> Message:
    """Parse any SecAgg message from untrusted bytes. Raises only InvalidMessage."""
    r = Reader(data)
    version = r.u8()
    if version != VERSION:
        raise InvalidMessage(f"expected message version {VERSION}, got {version}")
    tag = r.u8()
    parser = _PARSERS.get(tag)
    if parser is None:
        raise InvalidMessage(f"unknown message tag 0x{tag:02x}")
    message = parser(r)
    r.done()
    return message


def decode_server_message(data: bytes) -> ServerMessage:
    """Parse a message a client receives; a client-to-server message is an InvalidMessage."""
    message = decode(data)
    if not isinstance(message, SERVER_MESSAGES):
        raise InvalidMessage(f"expected a server message, got {type(message).__name__}")
    return message  # type: ignore[return-value]


def decode_client_message(data: bytes) -> ClientMessage:
    """Parse a message the server receives; a server-to-client message is an InvalidMessage."""
    message = decode(data)
    if not isinstance(message, CLIENT_MESSAGES):
        raise InvalidMessage(f"expected a client message, got {type(message).__name__}")
    return message  # type: ignore[return-value]
