"""The server messages a site decodes, decoded once per process (:class:`DecodeCache`)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

from fedcore.secagg.messages import decode_server_message


class DecodeCache:
    """Server messages decoded once per process. A site's stage replays its round's transcript
    (every earlier request, see :meth:`SecAggClient.rebuild`), and the reveal and share-keys
    requests carry all n adverts: decoding them again at every stage was a fifth of a SecAgg+
    round at 100 sites (issue 24). Keyed by the payload's SHA-256, so a hit is the decode of the
    same bytes; the decoded messages are frozen dataclasses, so sharing one is safe; a site only
    ever gets back what its own bytes decode to. Bounded by the payload bytes held (LRU)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.held = max_bytes, 0
        self.entries: OrderedDict[bytes, tuple[int, Any]] = OrderedDict()
        self.lock = threading.Lock()

    def __call__(self, payload: bytes) -> Any:
        digest = hashlib.sha256(payload).digest()
        with self.lock:
            hit = self.entries.get(digest)
            if hit is not None:
                self.entries.move_to_end(digest)
                return hit[1]
        message = decode_server_message(payload)  # raises for bad bytes: nothing is cached
        with self.lock:
            if digest not in self.entries and len(payload) <= self.max_bytes:
                self.entries[digest] = (len(payload), message)
                self.held += len(payload)
                while self.held > self.max_bytes:
                    _, (size, _) = self.entries.popitem(last=False)
                    self.held -= size
        return message


decoded = DecodeCache(max_bytes=256 * 2**20)
