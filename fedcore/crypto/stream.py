"""AES-256-CTR keystreams and a cryptographically secure random generator built on them.

Theory of operation: AES-256 in counter mode, keyed with a uniformly random 32-byte key, is a
pseudorandom function family; its keystream is indistinguishable from uniform bytes for any
efficient observer (NIST SP 800-90A, CTR_DRBG, uses the same construction). :class:`CryptoRng`
draws its key from the operating system's CSPRNG (``os.urandom``) by default, and from a caller's
seed only where a caller asks for reproducibility (tests, vectors). Numbers are derived from the
keystream without any ``numpy.random`` generator:

- uniform floats in [0, 1): the top 53 bits of a 64-bit word, times 2**-53;
- standard normals: the Box-Muller transform (Box and Muller, 1958) on two uniforms in (0, 1];
- unsigned integers below 2**b: the low b bits of 64-bit words (exactly uniform for b <= 64).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedcore.errors import ConfigError

KEY_BYTES = 32
_CHUNK = 1 << 20  # bytes of keystream produced per call into a preallocated buffer


def aes_ctr_keystream(key: bytes, nbytes: int, *, nonce: bytes = bytes(16)) -> bytes:
    """Return the first ``nbytes`` of the AES-256-CTR keystream for ``key`` and ``nonce``."""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"AES-256 key must be {KEY_BYTES} bytes, got {len(key)}")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
    return encryptor.update(bytes(nbytes))


class CryptoRng:
    """A random generator whose output is an AES-256-CTR keystream.

    ``CryptoRng()`` keys itself from ``os.urandom``. ``CryptoRng.from_seed(seed)`` is the
    deterministic entry point for tests and stored vectors; production code never passes a seed.
    The object is stateful (it advances along its keystream) and is not thread-safe.
    """

    __slots__ = ("_encryptor", "_zeros")

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            key = os.urandom(KEY_BYTES)
        if len(key) != KEY_BYTES:
            raise ConfigError(f"CryptoRng key must be {KEY_BYTES} bytes, got {len(key)}")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._zeros = memoryview(bytes(_CHUNK))

    @classmethod
    def from_seed(cls, seed: int | bytes, *, purpose: str = "") -> CryptoRng:
        """A reproducible generator: the key is SHA-256 of the seed and a purpose label."""
        raw = seed if isinstance(seed, bytes) else int(seed).to_bytes(16, "little", signed=True)
        return cls(hashlib.sha256(b"fedcore.CryptoRng|" + purpose.encode() + b"|" + raw).digest())

    def fill(self, out: np.ndarray) -> np.ndarray:
        """Overwrite the bytes of the C-contiguous array ``out`` with keystream; return ``out``."""
        view = out.data.cast("B")
        for start in range(0, len(view), _CHUNK):
            stop = min(start + _CHUNK, len(view))
            self._encryptor.update_into(self._zeros[: stop - start], view[start:stop])
        return out

    def bytes(self, n: int) -> bytes:
        """``n`` uniformly random bytes."""
        return self.fill(np.empty(n, dtype=np.uint8)).tobytes()

    def uint64(self, n: int) -> np.ndarray:
        """``n`` uniformly random 64-bit unsigned integers."""
        return self.fill(np.empty(n, dtype=np.uint64))

    def integers_below_pow2(self, n: int, bits: int) -> np.ndarray:
        """``n`` integers uniform in [0, 2**bits), as uint64; ``bits`` from 1 to 64."""
        if not 1 <= bits <= 64:
            raise ConfigError(f"bits must be in 1..64, got {bits}")
        words = self.uint64(n)
        if bits < 64:
            words &= np.uint64((1 << bits) - 1)
        return words

    def uniform(self, n: int) -> np.ndarray:
        """``n`` floats uniform in [0, 1), with 53 random bits each."""
        return (self.uint64(n) >> np.uint64(11)).astype(np.float64) * (2.0**-53)

    def standard_normal(self, n: int) -> np.ndarray:
        """``n`` independent N(0, 1) floats (Box-Muller on keystream uniforms)."""
        half = (n + 1) // 2
        # 1 - U lies in (0, 1], so the logarithm is finite.
        u1 = 1.0 - self.uniform(half)
        u2 = self.uniform(half)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * np.pi * u2
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]

    def normal(self, n: int, *, std: float) -> np.ndarray:
        """``n`` independent N(0, std**2) floats."""
        if not np.isfinite(std) or std < 0:
            raise ConfigError(f"noise standard deviation must be finite and >= 0, got {std}")
        return self.standard_normal(n) * std
