"""Mask expansion: both keystream paths give the plain AES-256-CTR stream; many keys at once
equal one key at a time."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.crypto import CryptoRng, aes_ctr_keystream, expand
from fedcore.crypto.expand import (
    CHUNK_WORDS,
    GCM_MIN_BYTES,
    add_keystream,
    add_keystreams,
    keystream_words,
)
from fedcore.errors import ConfigError


def _ctr_words(key: bytes, n: int, dtype: type) -> np.ndarray:
    """The reference: OpenSSL's AES-256-CTR from a zero counter block, as little-endian words."""
    width = np.dtype(dtype).itemsize
    raw = aes_ctr_keystream(key, n * width)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("delta", [-2, -1, 0, 1, 3])
def test_both_paths_give_the_ctr_stream_around_the_switch_over(dtype: type, delta: int) -> None:
    # Below GCM_MIN_BYTES the CTR path runs, from it on the GCM-core path; odd word counts leave a
    # partial AES block at the end.
    n = GCM_MIN_BYTES // np.dtype(dtype).itemsize + delta
    key = bytes(range(1, 33))
    np.testing.assert_array_equal(keystream_words(key, n, dtype), _ctr_words(key, n, dtype))


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_gcm_path_over_several_chunks_and_a_ragged_end(dtype: type) -> None:
    n = 4 * CHUNK_WORDS + 5
    key = CryptoRng.from_seed(9, purpose="expand").bytes(32)
    np.testing.assert_array_equal(keystream_words(key, n, dtype), _ctr_words(key, n, dtype))


def test_many_keys_at_once_equal_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = CryptoRng.from_seed(10, purpose="expand")
    keys = [rng.bytes(32) for _ in range(7)]
    for n in (1, 33, CHUNK_WORDS + 17, 2 * CHUNK_WORDS):
        for dtype in (np.uint32, np.uint64):
            base = rng.integers_below_pow2(n, 8 * np.dtype(dtype).itemsize).astype(dtype)
            one_by_one = base.copy()
            for i, key in enumerate(keys):
                add_keystream(one_by_one, key, subtract=i % 3 == 0)
            subtracts = [k for i, k in enumerate(keys) if i % 3 == 0]
            adds = [k for i, k in enumerate(keys) if i % 3 != 0]
            at_once = base.copy()
            add_keystreams(at_once, adds=adds, subtracts=subtracts)
            np.testing.assert_array_equal(at_once, one_by_one)
            monkeypatch.setattr(expand, "_MAX_STREAMS", 2)  # several passes over the vector
            batched = base.copy()
            add_keystreams(batched, adds=adds, subtracts=subtracts)
            monkeypatch.undo()
            np.testing.assert_array_equal(batched, one_by_one)
            add_keystreams(at_once, adds=subtracts, subtracts=adds)
            np.testing.assert_array_equal(at_once, base)


def test_add_keystreams_validates_before_touching_the_accumulator() -> None:
    acc = np.arange(10, dtype=np.uint32)
    with pytest.raises(ConfigError):
        add_keystreams(acc, adds=[bytes(32)], subtracts=[bytes(32), bytes(31)])
    np.testing.assert_array_equal(acc, np.arange(10, dtype=np.uint32))
    with pytest.raises(ConfigError):
        add_keystreams(np.zeros(4, dtype=np.int64), adds=[bytes(32)])
    add_keystreams(acc)  # no keys: nothing to do
    np.testing.assert_array_equal(acc, np.arange(10, dtype=np.uint32))
    empty = np.zeros(0, dtype=np.uint64)
    add_keystreams(empty, adds=[bytes(32)])
    assert empty.shape == (0,)
