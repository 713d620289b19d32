"""Ed25519 signatures: sign with a 32-byte seed, verify against a 32-byte public key.

Theory of operation: Ed25519 (RFC 8032) signatures are deterministic and existentially
unforgeable under chosen-message attack. In SecAgg's active-adversary mode (Bonawitz et al.,
CCS 2017, section 6) each site signs its key advert and its view of the survivor set with a
long-term key whose public half sits in a registry the clients trust, so a server cannot inject
sybil keys or show different survivor sets to different clients. Verification raises; it never
returns a bool.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError, InvalidMessage

SEED_BYTES = 32
PUBLIC_BYTES = 32
SIGNATURE_BYTES = 64


def signing_keypair(rng: CryptoRng) -> tuple[bytes, bytes]:
    """Draw an Ed25519 seed from ``rng``; return ``(seed, public_key)``."""
    seed = rng.bytes(SEED_BYTES)
    return seed, verify_key_of(seed)


def verify_key_of(seed: bytes) -> bytes:
    """The 32-byte public key of an Ed25519 seed."""
    if len(seed) != SEED_BYTES:
        raise ConfigError(f"Ed25519 seed must be {SEED_BYTES} bytes, got {len(seed)}")
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()


def sign(seed: bytes, message: bytes) -> bytes:
    """A 64-byte Ed25519 signature of ``message``."""
    if len(seed) != SEED_BYTES:
        raise ConfigError(f"Ed25519 seed must be {SEED_BYTES} bytes, got {len(seed)}")
    return Ed25519PrivateKey.from_private_bytes(seed).sign(message)


def verify(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Return None if ``signature`` is valid for ``message``; raise InvalidMessage otherwise."""
    if len(public_key) != PUBLIC_BYTES:
        raise InvalidMessage(
            f"Ed25519 public key must be {PUBLIC_BYTES} bytes, got {len(public_key)}"
        )
    if len(signature) != SIGNATURE_BYTES:
        raise InvalidMessage(
            f"Ed25519 signature must be {SIGNATURE_BYTES} bytes, got {len(signature)}"
        )
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise InvalidMessage("Ed25519 signature does not verify") from exc
