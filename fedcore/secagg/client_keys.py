"""A client's secrets for one round, drawn in a fixed order from one generator.

Re-creating a client (Flower may start a fresh process for each message): every secret of a client
is drawn from the ``rng`` it is given, in a fixed order, at construction (both X25519 key pairs,
the self-mask seed b_u, and a key from which each session's Shamir coefficients and AEAD nonces
are derived). So a site that builds the generator as
``derive_rng(site_key, context=b"secagg|" + round_id)`` gets the same client back in any process,
and :meth:`fedcore.secagg.SecAggClient.rebuild` replays the server messages the client has
received so far to reach the same state. A site that rebuilds clients must persist, per round id,
the session id it answered (:attr:`~fedcore.secagg.SecAggClient.session_id`) and whether it has
answered an unmask request, and refuse to serve a second, different one: a fresh process cannot
otherwise know that a server is replaying a different history to it (forking the client).

The mask key s_u is kept, and Shamir-shared, as the scalar X25519 actually uses (clamped, RFC 7748
section 5): :func:`clamped` maps the 2**5 byte strings that share a public key to one, so the
server checks a rebuilt key against its exact bytes (canonical form and advertised public key),
never against a value many secrets share (issue 21, point 5).
"""

from __future__ import annotations

from fedcore.crypto.agreement import AgreementKey, derive_key, x25519_keypair
from fedcore.crypto.stream import CryptoRng


def clamped(scalar: bytes) -> bytes:
    """The canonical form of a 32-byte X25519 private scalar: bits 0-2 and 255 cleared, bit 254
    set (RFC 7748, section 5). Every string and its clamped form give the same public key."""
    return bytes([scalar[0] & 248, *scalar[1:31], (scalar[31] & 127) | 64])


class ClientKeys:
    """(c_u, c_u^PK) to encrypt shares, (s_u, s_u^PK) to agree mask seeds, the self-mask seed b_u,
    and the coin key; drawn from ``rng`` in that order (the re-creation contract: never reorder)."""

    __slots__ = ("enc_public", "mask_private", "mask_public", "seed", "_coin_key", "enc", "mask")

    def __init__(self, rng: CryptoRng) -> None:
        enc_private, self.enc_public = x25519_keypair(rng)
        mask_private, self.mask_public = x25519_keypair(rng)
        self.mask_private = clamped(mask_private)  # the same key; its one canonical encoding
        self.seed = rng.bytes(32)
        self._coin_key = rng.bytes(32)
        self.enc = AgreementKey(enc_private)
        self.mask = AgreementKey(self.mask_private)

    def coins(self, session_id: bytes) -> CryptoRng:
        """The generator of one session's Shamir coefficients and AEAD nonces."""
        return CryptoRng(
            derive_key(self._coin_key, salt=session_id, info=b"fedcore/secagg/v1/coins")
        )
