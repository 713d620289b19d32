"""Cryptographic primitives: the only package of fedcore that imports ``cryptography.hazmat``.

Everything above it calls recipe-sized functions. Modules:

- :mod:`fedcore.crypto.stream`: AES-256-CTR keystreams and :class:`CryptoRng`, the generator behind
  every mask, every stochastic rounding and every DP noise draw.
- :mod:`fedcore.crypto.expand`: a seed expanded into a mask and added in place (SecAgg masks).
- :mod:`fedcore.crypto.agreement`: X25519 agreement (refusing all-zero secrets), HKDF-SHA256.
- :mod:`fedcore.crypto.aead`: seal and open a short payload with AES-256-GCM and associated data.
- :mod:`fedcore.crypto.signing`: Ed25519 sign and verify (verification raises).
"""

from fedcore.crypto.stream import CryptoRng, aes_ctr_keystream

__all__ = ["CryptoRng", "aes_ctr_keystream"]
