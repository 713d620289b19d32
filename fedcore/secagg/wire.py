"""A strict little binary codec for SecAgg messages: fixed-width integers and length-prefixed bytes.

Every read checks the bytes that remain before it touches them, and a parse must consume the input
exactly, so truncated, padded or garbled input fails with :class:`~fedcore.errors.InvalidMessage`
and nothing else. Counts are checked against the bytes left before any list is built, so a forged
count cannot make the parser allocate more than the message's own size.
"""

from __future__ import annotations

import struct

from fedcore.errors import InvalidMessage

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Writer:
    """Appends fields to a growing byte string."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes | memoryview] = []

    def u8(self, value: int) -> Writer:
        self._parts.append(_U8.pack(value))
        return self

    def u16(self, value: int) -> Writer:
        self._parts.append(_U16.pack(value))
        return self

    def u32(self, value: int) -> Writer:
        self._parts.append(_U32.pack(value))
        return self

    def u64(self, value: int) -> Writer:
        self._parts.append(_U64.pack(value))
        return self

    def fixed(self, data: bytes, size: int) -> Writer:
        if len(data) != size:
            raise ValueError(f"field must be {size} bytes, got {len(data)}")
        self._parts.append(bytes(data))
        return self

    def blob(self, data: bytes) -> Writer:
        self.u32(len(data))
        self._parts.append(bytes(data))
        return self

    def ids(self, values: tuple[int, ...]) -> Writer:
        self.u32(len(values))
        for v in values:
            self.u64(v)
        return self

    def raw(self, data: bytes | memoryview) -> Writer:
        """Append bytes as they are; a memoryview is not copied until :meth:`getvalue`."""
        self._parts.append(data if isinstance(data, memoryview) else bytes(data))
        return self

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Reads fields from untrusted bytes; every failure is an InvalidMessage."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidMessage(f"expected bytes, got {type(data).__name__}")
        self._data = memoryview(bytes(data))
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def _take(self, n: int) -> memoryview:
        if n < 0 or n > self.remaining:
            raise InvalidMessage(f"message truncated: needed {n} bytes, {self.remaining} left")
        view = self._data[self._pos : self._pos + n]
        self._pos += n
        return view

    def u8(self) -> int:
        return int(_U8.unpack(self._take(1))[0])

    def u16(self) -> int:
        return int(_U16.unpack(self._take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self._take(8))[0])

    def fixed(self, size: int) -> bytes:
        return bytes(self._take(size))

    def blob(self, max_size: int | None = None) -> bytes:
        size = self.u32()
        if max_size is not None and size > max_size:
            raise InvalidMessage(f"field of {size} bytes exceeds the limit of {max_size}")
        return bytes(self._take(size))

    def count(self, item_size: int) -> int:
        """A list length, refused if the items could not fit in the bytes left."""
        n = self.u32()
        if n * item_size > self.remaining:
            raise InvalidMessage(
                f"count {n} of {item_size}-byte items exceeds the {self.remaining} bytes left"
            )
        return n

    def ids(self) -> tuple[int, ...]:
        return tuple(self.u64() for _ in range(self.count(8)))

    def view(self, n: int) -> memoryview:
        return self._take(n)

    def done(self) -> None:
        if self.remaining:
            raise InvalidMessage(f"{self.remaining} unexpected trailing bytes")
