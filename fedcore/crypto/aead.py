"""Sealing and opening short payloads with AES-256-GCM, bound to associated data.

Theory of operation: AES-GCM (NIST SP 800-38D) is an authenticated cipher: without the key nobody
can produce a ciphertext that opens, and any change to the ciphertext or to its associated data
makes opening fail. SecAgg (Bonawitz et al., CCS 2017, section 4, "ShareKeys") encrypts each secret
share to its holder; binding sender, receiver and session id as associated data means a share
replayed to another holder, another session or from another sender does not open. Each key here is
derived for one (session, sender, receiver) and seals one message, and the 96-bit nonce is drawn
from the caller's generator as well, so a nonce never repeats under a key.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError, InvalidMessage

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


def seal(key: bytes, plaintext: bytes, *, associated_data: bytes, rng: CryptoRng) -> bytes:
    """Encrypt and authenticate: ``nonce || ciphertext || tag``."""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"AES-256-GCM key must be {KEY_BYTES} bytes, got {len(key)}")
    nonce = rng.bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, sealed: bytes, *, associated_data: bytes) -> bytes:
    """Inverse of :func:`seal`. Raises InvalidMessage if the bytes or their binding were altered."""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"AES-256-GCM key must be {KEY_BYTES} bytes, got {len(key)}")
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise InvalidMessage(
            f"sealed payload needs at least {NONCE_BYTES + TAG_BYTES} bytes, got {len(sealed)}"
        )
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data)
    except InvalidTag as exc:
        raise InvalidMessage(
            "sealed payload did not authenticate (wrong key, sender, receiver or session)"
        ) from exc
