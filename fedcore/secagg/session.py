"""Key schedule of one session: the session id and every key derived from it.

Theory of operation: all keys of a round descend from two X25519 agreements per pair of clients
(Bonawitz et al., CCS 2017, section 4: ``c`` keys to encrypt shares, ``s`` keys to agree mask
seeds) through HKDF-SHA256 with explicit domain separation (RFC 5869 section 3.2):

- the *session id* is SHA-256 over the round's settings (participants, threshold, graph, mode,
  ring, and how sites encode their updates: clip range, weight budget, DP clip norm) and every
  advertised key (the set U1), so two clients shown different key sets or settings derive
  different keys and nothing they exchange opens;
- a *share key* is HKDF(agree(c_u, c_v^PK), salt = session id, info = "share-key" | u | v): one key
  per direction of each pair and session;
- a *pairwise mask seed* is HKDF(agree(s_u, s_v^PK), salt = session id, info = "pairwise-mask" |
  min(u, v) | max(u, v)): the same for both members of the pair (eq. (1) of the paper);
- the *self-mask key* is HKDF(b_u, salt = session id, info = "self-mask"), where b_u is the
  client's self-mask seed, shared with Shamir and committed to in the advert with SHA-256, so a
  server can check what it rebuilt.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from fedcore.crypto.agreement import AgreementKey, agree, derive_key
from fedcore.errors import InvalidMessage
from fedcore.secagg.config import SessionConfig, write_encoding
from fedcore.secagg.messages import SHARE_BYTES, KeyAdvert
from fedcore.secagg.wire import Reader, Writer

DOMAIN = b"fedcore/secagg/v1/"


def session_id(config: SessionConfig, adverts: Iterable[KeyAdvert]) -> bytes:
    """SHA-256 of the settings and of every accepted advert, in sender order."""
    w = Writer().raw(DOMAIN + b"session").blob(config.round_id).ids(config.clients)
    w.u32(config.threshold).u32(config.length).u8(config.bits).u32(config.neighbors)
    w.u8(config.mode.value)
    if config.encoding is not None:  # absent only for raw ring vectors (the in-memory harness)
        write_encoding(w, config.encoding)
    for a in sorted(adverts, key=lambda a: a.sender):
        w.u64(a.sender).raw(a.enc_public).raw(a.mask_public).raw(a.seed_commitment)
    return hashlib.sha256(w.getvalue()).digest()


def seed_commitment(round_id: bytes, sender: int, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed, bound to the round and the sender."""
    w = Writer().raw(DOMAIN + b"seed-commitment").blob(round_id).u64(sender).raw(seed)
    return hashlib.sha256(w.getvalue()).digest()


def check_seed_commitment(round_id: bytes, sender: int, seed: bytes, commitment: bytes) -> None:
    """Raise InvalidMessage unless ``seed`` opens ``commitment``."""
    if not hmac.compare_digest(seed_commitment(round_id, sender, seed), commitment):
        raise InvalidMessage(
            f"rebuilt self-mask seed of client {sender} does not match its commitment"
        )


def advert_signed_bytes(advert: KeyAdvert) -> bytes:
    """What a site signs in ACTIVE mode: the advert without its signature."""
    w = Writer().raw(DOMAIN + b"advert").blob(advert.round_id).u64(advert.sender)
    return w.raw(advert.enc_public).raw(advert.mask_public).raw(advert.seed_commitment).getvalue()


def survivors_signed_bytes(sid: bytes, survivors: tuple[int, ...]) -> bytes:
    """What a client signs in the consistency check: the session and the survivor set U3."""
    return Writer().raw(DOMAIN + b"survivors").raw(sid).ids(survivors).getvalue()


def share_key(
    private: bytes | AgreementKey, peer_public: bytes, sid: bytes, sender: int, receiver: int
) -> bytes:
    """The AES-GCM key for the shares ``sender`` sends ``receiver`` in session ``sid``."""
    return share_key_from_secret(agree(private, peer_public), sid, sender, receiver)


def share_key_from_secret(shared: bytes, sid: bytes, sender: int, receiver: int) -> bytes:
    """:func:`share_key` from the X25519 secret already agreed (it serves both directions)."""
    info = Writer().raw(DOMAIN + b"share-key").u64(sender).u64(receiver).getvalue()
    return derive_key(shared, salt=sid, info=info)


def share_associated_data(sid: bytes, sender: int, receiver: int) -> bytes:
    return Writer().raw(DOMAIN + b"share").raw(sid).u64(sender).u64(receiver).getvalue()


def pairwise_seed(
    private: bytes | AgreementKey, peer_public: bytes, sid: bytes, u: int, v: int
) -> bytes:
    """The mask seed s_{u,v} = s_{v,u} of a pair of clients."""
    lo, hi = min(u, v), max(u, v)
    info = Writer().raw(DOMAIN + b"pairwise-mask").u64(lo).u64(hi).getvalue()
    return derive_key(agree(private, peer_public), salt=sid, info=info)


def self_mask_key(seed: bytes, sid: bytes) -> bytes:
    """The AES key whose keystream is a client's self mask PRG(b_u)."""
    return derive_key(seed, salt=sid, info=DOMAIN + b"self-mask")


def encode_share_pair(sender: int, receiver: int, seed_share: int, key_share: int) -> bytes:
    """Plaintext of one sealed share: both ids again, then the two field elements."""
    w = Writer().u64(sender).u64(receiver)
    w.raw(seed_share.to_bytes(SHARE_BYTES, "big")).raw(key_share.to_bytes(SHARE_BYTES, "big"))
    return w.getvalue()


def decode_share_pair(data: bytes) -> tuple[int, int, int, int]:
    """Inverse of :func:`encode_share_pair`; raises InvalidMessage on malformed input."""
    r = Reader(data)
    sender, receiver = r.u64(), r.u64()
    seed_share = int.from_bytes(r.fixed(SHARE_BYTES), "big")
    key_share = int.from_bytes(r.fixed(SHARE_BYTES), "big")
    r.done()
    return sender, receiver, seed_share, key_share
