"""Cryptographic primitives: the only package of fedcore that imports ``cryptography.hazmat``.

Everything above it calls recipe-sized functions. Modules:

- :mod:`fedcore.crypto.stream`: AES-256-CTR keystreams and :class:`CryptoRng`, the generator behind
  every mask, every stochastic rounding and every DP noise draw.
"""

from fedcore.crypto.stream import CryptoRng, aes_ctr_keystream

__all__ = ["CryptoRng", "aes_ctr_keystream"]
