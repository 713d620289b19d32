"""Expanding a 32-byte seed into a mask and adding it in place, modulo 2**32 or 2**64.

Theory of operation: SecAgg masks a vector with pseudorandom vectors PRG(seed) (Bonawitz et al.,
CCS 2017, section 4, eq. (1) and the masked input ``y_u``). Here PRG(seed) is the AES-256-CTR
keystream under key ``seed`` with an all-zero initial counter block (a 128-bit big-endian counter
starting at 0), read as little-endian words: a pseudorandom function family, so the mask is
indistinguishable from uniform as long as the seed is secret (NIST SP 800-90A uses the same
construction). Each seed keys one mask only.

Speed. The same keystream is computed two ways, chosen by length only (the bytes are identical):

- short streams: OpenSSL's AES-256-CTR directly;
- long streams: the first two blocks (counters 0 and 1) from AES-256-CTR, the rest from the
  counter-mode core of AES-256-GCM with an all-zero 96-bit IV, whose payload blocks are
  AES_K(0^96 || [i]_32) for i = 2, 3, ... (NIST SP 800-38D, sections 6.5 and 7.1: GCTR starting
  at inc32(J0), J0 = IV || 0^31 || 1). For fewer than 2**32 - 2 payload blocks the 32-bit
  increment never carries, so these are exactly the 128-bit CTR counter blocks 2, 3, ... The GCM
  tag is never finalised or used: the GHASH work is waste, but OpenSSL's GCM path is
  stitched with vector AES (VAES/AVX-512 on current x86) and runs about twice as fast as its CTR
  path on such cores, GHASH included. ``tests/crypto`` checks both paths against the plain
  AES-CTR keystream, across the switch-over length and chunk boundaries.

The keystream is written into a scratch buffer of a few hundred KiB (it stays in the L2 cache) and
added to, or subtracted from, the accumulator chunk by chunk, so the mask is never materialised
whole and nothing is allocated per chunk. :func:`add_keystreams` takes several keys at once and
walks the accumulator once, applying every key's keystream to each chunk while that chunk is in
cache (cache blocking): one pass over the vector instead of one per key. Unsigned numpy arithmetic
wraps, which is exactly addition modulo 2**32 or 2**64; a ring 2**b with smaller b is a quotient of
that ring, so a caller reduces once at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from fedcore.errors import ConfigError

KEY_BYTES = 32
CHUNK_WORDS = 1 << 16  # words per chunk: 256 KiB of uint32 or 512 KiB of uint64, well inside L2
_BLOCK = 16
_HEAD = 2 * _BLOCK  # counter blocks 0 and 1, which the GCM core does not produce
# Below this many keystream bytes, the second cipher context the GCM path needs costs more than
# its faster keystream saves (a context is ~5-10 us; the GCM core saves ~0.1 ns per byte).
GCM_MIN_BYTES = 1 << 17
_GCM_MAX_BYTES = _HEAD + (2**32 - 2) * _BLOCK  # no carry out of GCM's 32-bit counter
_ZEROS = memoryview(bytes(8 * CHUNK_WORDS))  # a memoryview: slicing it copies nothing
_MAX_STREAMS = 256  # cipher contexts open at once (each holds key schedules and GCM tables)
_WORD_TYPES = (np.dtype(np.uint32), np.dtype(np.uint64))
_SWAP = sys.byteorder == "big"  # the keystream is defined as little-endian words


class _Stream:
    """The AES-256-CTR keystream of one key, zero initial counter, handed out in order."""

    __slots__ = ("_cipher", "_head")

    def __init__(self, key: bytes, nbytes: int) -> None:
        ctr = Cipher(algorithms.AES(key), modes.CTR(bytes(_BLOCK))).encryptor()
        self._head = b""
        self._cipher: CipherContext = ctr
        if GCM_MIN_BYTES <= nbytes <= _GCM_MAX_BYTES:
            self._head = ctr.update(bytes(_HEAD))
            self._cipher = Cipher(algorithms.AES(key), modes.GCM(bytes(12))).encryptor()

    def fill(self, out: memoryview) -> None:
        """Overwrite ``out`` (a byte view) with the next ``len(out)`` keystream bytes."""
        head = self._head
        if head:  # first chunk only; it holds min(chunk, stream) bytes, far more than _HEAD
            out[:_HEAD] = head
            self._head = b""
            self._cipher.update_into(_ZEROS[: len(out) - _HEAD], out[_HEAD:])
        else:
            self._cipher.update_into(_ZEROS[: len(out)], out)


def add_keystreams(
    acc: np.ndarray, *, adds: Sequence[bytes] = (), subtracts: Sequence[bytes] = ()
) -> None:
    """In place: ``acc += sum(PRG(k) for k in adds) - sum(PRG(k) for k in subtracts)``, wrapping
    modulo 2**(8*itemsize). The result equals that of one :func:`add_keystream` per key.

    ``acc`` must be a C-contiguous one-dimensional uint32 or uint64 array and every key 32 bytes.
    Raises ConfigError otherwise, leaving ``acc`` unchanged.
    """
    keys = [*adds, *subtracts]
    for key in keys:
        if len(key) != KEY_BYTES:
            raise ConfigError(f"mask seed must be {KEY_BYTES} bytes, got {len(key)}")
    if acc.ndim != 1 or acc.dtype not in _WORD_TYPES or not acc.flags.c_contiguous:
        raise ConfigError(
            f"mask accumulator must be a contiguous 1-D uint32/uint64 array, got {acc.dtype} "
            f"with shape {acc.shape}"
        )
    n = len(acc)
    if n == 0:
        return
    scratch = np.empty(min(CHUNK_WORDS, n), dtype=acc.dtype)
    signed: list[tuple[bytes, np.ufunc]] = [(key, np.add) for key in adds]
    signed += [(key, np.subtract) for key in subtracts]
    for first in range(0, len(signed), _MAX_STREAMS):
        _apply(acc, signed[first : first + _MAX_STREAMS], scratch)


def _apply(acc: np.ndarray, signed: list[tuple[bytes, np.ufunc]], scratch: np.ndarray) -> None:
    """One pass over ``acc``: each chunk gets every key's keystream while it is in cache."""
    n, width = len(acc), acc.dtype.itemsize
    streams = [(_Stream(key, n * width), op) for key, op in signed]
    raw = scratch.data.cast("B")
    for start in range(0, n, CHUNK_WORDS):
        target = acc[start : start + CHUNK_WORDS]
        words = len(target)
        chunk = scratch[:words]
        out = raw[: words * width]
        for stream, op in streams:
            stream.fill(out)
            if _SWAP:
                chunk.byteswap(inplace=True)
            op(target, chunk, out=target)


def add_keystream(acc: np.ndarray, key: bytes, *, subtract: bool = False) -> None:
    """In place: ``acc += PRG(key)`` (or ``-=`` with ``subtract``), wrapping modulo 2**(8*itemsize).

    ``acc`` must be a C-contiguous one-dimensional uint32 or uint64 array. Raises ConfigError
    otherwise, leaving ``acc`` unchanged.
    """
    if subtract:
        add_keystreams(acc, subtracts=(key,))
    else:
        add_keystreams(acc, adds=(key,))


def keystream_words(key: bytes, n: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """PRG(key) as ``n`` words of ``dtype`` (uint32 or uint64), as :func:`add_keystream` adds it."""
    out = np.zeros(n, dtype=dtype)
    add_keystream(out, key)
    return out
