"""Expanding a 32-byte seed into a mask and adding it in place, modulo 2**32 or 2**64.

Theory of operation: SecAgg masks a vector with pseudorandom vectors PRG(seed) (Bonawitz et al.,
CCS 2017, section 4, eq. (1) and the masked input ``y_u``). Here PRG(seed) is the AES-256-CTR
keystream under key ``seed`` with an all-zero initial counter block, read as little-endian words:
a pseudorandom function family, so the mask is indistinguishable from uniform as long as the seed
is secret (NIST SP 800-90A uses the same construction). Each seed keys one mask only.

Speed: the keystream is written into a scratch buffer of a few hundred KiB (it stays in the L2
cache) and added to, or subtracted from, the accumulator chunk by chunk, so the vector is never
materialised twice and no allocation happens per chunk. Unsigned numpy arithmetic wraps, which is
exactly addition modulo 2**32 or 2**64; a ring 2**b with smaller b is a quotient of that ring, so a
caller reduces once at the end.
"""

from __future__ import annotations

import sys

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedcore.errors import ConfigError

KEY_BYTES = 32
CHUNK_WORDS = 1 << 16  # 256 KiB of uint32 or 512 KiB of uint64: fits in L2 on current x86 cores
_ZEROS = bytes(8 * CHUNK_WORDS)
_WORD_TYPES = (np.dtype(np.uint32), np.dtype(np.uint64))


def add_keystream(acc: np.ndarray, key: bytes, *, subtract: bool = False) -> None:
    """In place: ``acc += PRG(key)`` (or ``-=`` with ``subtract``), wrapping modulo 2**(8*itemsize).

    ``acc`` must be a C-contiguous one-dimensional uint32 or uint64 array. Raises ConfigError
    otherwise, leaving ``acc`` unchanged.
    """
    if len(key) != KEY_BYTES:
        raise ConfigError(f"mask seed must be {KEY_BYTES} bytes, got {len(key)}")
    if acc.ndim != 1 or acc.dtype not in _WORD_TYPES or not acc.flags.c_contiguous:
        raise ConfigError(
            f"mask accumulator must be a contiguous 1-D uint32/uint64 array, got {acc.dtype} "
            f"with shape {acc.shape}"
        )
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    width = acc.dtype.itemsize
    scratch = np.empty(min(CHUNK_WORDS, len(acc)), dtype=acc.dtype)
    raw = scratch.data.cast("B")
    op = np.subtract if subtract else np.add
    swap = sys.byteorder == "big"
    for start in range(0, len(acc), CHUNK_WORDS):
        stop = min(start + CHUNK_WORDS, len(acc))
        words = stop - start
        encryptor.update_into(_ZEROS[: words * width], raw[: words * width])
        chunk = scratch[:words]
        if swap:  # the keystream is defined as little-endian words
            chunk.byteswap(inplace=True)
        target = acc[start:stop]
        op(target, chunk, out=target)


def keystream_words(key: bytes, n: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """PRG(key) as ``n`` words of ``dtype`` (uint32 or uint64), as :func:`add_keystream` adds it."""
    out = np.zeros(n, dtype=dtype)
    add_keystream(out, key)
    return out
