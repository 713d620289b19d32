"""A site decodes each server message once per process (fedcore/federation/site/decoded.py):
a hit is the decode of the very same bytes, bad bytes are never cached, and the cache holds at
most its byte bound."""

from __future__ import annotations

import pytest

from fedcore.errors import InvalidMessage
from fedcore.federation.site import decoded as dc


@pytest.fixture
def counted(monkeypatch):
    calls: list[bytes] = []

    def decode(payload: bytes):
        calls.append(payload)
        if payload.startswith(b"bad"):
            raise InvalidMessage("bad bytes")
        return ("decoded", payload)

    monkeypatch.setattr(dc, "decode_server_message", decode)
    return calls


def test_the_same_bytes_are_decoded_once_and_other_bytes_afresh(counted):
    cache = dc.DecodeCache(max_bytes=1 << 20)
    first = cache(b"share-keys for site 1")
    assert cache(b"share-keys for site 1") is first
    assert cache(b"share-keys for site 2") == ("decoded", b"share-keys for site 2")
    assert counted == [b"share-keys for site 1", b"share-keys for site 2"]


def test_bad_bytes_raise_every_time_and_are_not_kept(counted):
    cache = dc.DecodeCache(max_bytes=1 << 20)
    for _ in range(2):
        with pytest.raises(InvalidMessage):
            cache(b"bad payload")
    assert len(counted) == 2 and not cache.entries and cache.held == 0


def test_the_cache_holds_at_most_its_bound_dropping_the_least_recent(counted):
    cache = dc.DecodeCache(max_bytes=25)
    for k in range(5):
        cache(b"payload-%d" % k)  # 9 bytes each: at most two held
        assert cache.held <= 25
    assert [size for size, _ in cache.entries.values()] == [9, 9]
    cache(b"payload-0")  # dropped: decoded again
    assert counted.count(b"payload-0") == 2
    cache(b"x" * 26)  # larger than the bound: decoded, not kept
    assert cache.held <= 25


def test_the_site_decodes_through_the_cache():
    from fedcore.federation.site import secagg

    assert secagg._decoded is dc.decoded
