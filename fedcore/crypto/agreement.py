"""X25519 key agreement and HKDF-SHA256 key derivation: the recipes SecAgg builds its seeds from.

Theory of operation: X25519 (RFC 7748) gives two parties a shared 32-byte secret from one party's
private scalar and the other's public point; HKDF-SHA256 (RFC 5869) turns that secret, plus a salt
and a context label, into independent-looking keys, so one agreement can key several purposes
without any two of them being related (domain separation, RFC 5869 section 3.2). A public point of
small order makes the shared secret all zeros, which any observer can predict; RFC 7748 section 6.1
asks the caller to check for that, and :func:`agree` refuses it.

Private keys are plain 32-byte strings drawn from an injected :class:`~fedcore.crypto.CryptoRng`,
so a caller that re-creates the generator re-creates the keys (RFC 7748 section 5 clamps any
32 bytes into a valid scalar).
"""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError, InvalidMessage

KEY_BYTES = 32


def x25519_keypair(rng: CryptoRng) -> tuple[bytes, bytes]:
    """Draw a private scalar from ``rng``; return ``(private, public)``, 32 bytes each."""
    private = rng.bytes(KEY_BYTES)
    return private, x25519_public(private)


def x25519_public(private: bytes) -> bytes:
    """The public point of a 32-byte private scalar. Raises ConfigError on a wrong length."""
    if len(private) != KEY_BYTES:
        raise ConfigError(f"X25519 private key must be {KEY_BYTES} bytes, got {len(private)}")
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


class AgreementKey:
    """A loaded X25519 private key, for a caller that agrees with many peers.

    Loading a private key computes its public point (a scalar multiplication, as costly as the
    agreement itself), so a client that agrees with k neighbours loads its key once.
    """

    __slots__ = ("_key",)

    def __init__(self, private: bytes) -> None:
        if len(private) != KEY_BYTES:
            raise ConfigError(f"X25519 private key must be {KEY_BYTES} bytes, got {len(private)}")
        self._key = X25519PrivateKey.from_private_bytes(private)

    def __repr__(self) -> str:
        return "AgreementKey(<secret>)"


def agree(private: bytes | AgreementKey, peer_public: bytes) -> bytes:
    """The 32-byte X25519 shared secret of ``private`` and ``peer_public``.

    Raises InvalidMessage when the peer key is malformed or of small order (an all-zero shared
    secret, RFC 7748 section 6.1): such a key would make the "secret" public.
    """
    key = private if isinstance(private, AgreementKey) else AgreementKey(private)
    if len(peer_public) != KEY_BYTES:
        raise InvalidMessage(f"X25519 public key must be {KEY_BYTES} bytes, got {len(peer_public)}")
    try:
        shared = key._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # OpenSSL refuses an all-zero result
        raise InvalidMessage("X25519 agreement gave the all-zero secret (small-order key)") from exc
    if hmac.compare_digest(shared, bytes(KEY_BYTES)):
        raise InvalidMessage("X25519 agreement gave the all-zero secret (small-order key)")
    return shared


def derive_key(secret: bytes, *, salt: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``secret`` with ``salt`` and context label ``info``.

    Written out with the standard library's HMAC (section 2.2, extract, and 2.3, expand): a
    client derives several keys per neighbour, and the HMAC one-shot is an order of magnitude
    cheaper than building an HKDF object each time. Checked against RFC 5869's test vectors.
    """
    if not 1 <= length <= 255 * 32:
        raise ConfigError(f"HKDF output length must be in 1..8160, got {length}")
    prk = hmac.digest(salt or bytes(32), secret, "sha256")  # extract: PRK = HMAC(salt, IKM)
    out, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):  # expand: T(i) = HMAC(PRK, T(i-1)|info|i)
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
    return out[:length]


def derive_rng(secret: bytes, *, context: bytes) -> CryptoRng:
    """A CryptoRng keyed by HKDF of a secret and a public context label.

    This is how a site re-creates the generator of one protocol round from a key it holds and a
    public round id: ``derive_rng(site_key, context=b"secagg|" + round_id)``. ``secret`` must be at
    least 32 bytes of entropy; the label must differ for every use.
    """
    if len(secret) < KEY_BYTES:
        raise ConfigError(
            f"a derivation secret needs at least {KEY_BYTES} bytes, got {len(secret)}"
        )
    return CryptoRng(derive_key(secret, salt=b"fedcore.derive_rng", info=context))
