"""Wire format: every message round-trips; untrusted bytes give only the typed errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.errors import FedcoreError, InvalidMessage, RemoteProtocolError
from fedcore.secagg import Mode, SecAggClient, SecAggServer
from fedcore.secagg.messages import (
    VERSION,
    MaskedInput,
    decode,
    decode_client_message,
    decode_server_message,
    encode,
)

from .helpers import make_world

TYPED = (InvalidMessage, RemoteProtocolError)


def _all_messages() -> list[object]:
    out: list[object] = []
    # the complete graph in both modes, and a sparse one (its reveal stage and reveals)
    for mode, neighbors in ((Mode.SEMI_HONEST, 0), (Mode.ACTIVE, 0), (Mode.SEMI_HONEST, 2)):
        w = make_world(4, mode=mode, bits=20, seed=30, neighbors=neighbors)
        while w.server.stage is not None:
            for cid in sorted(w.requests):
                out.append(w.requests[cid])
                answer = w.answer(cid)
                out.append(answer)
                w.server.receive(cid, answer)
            if w.server.stage.value == "unmask":
                w.server.finish()
            else:
                w.requests = w.server.advance()
    return out


MESSAGES = _all_messages()
ENCODED = [encode(m) for m in MESSAGES]  # type: ignore[arg-type]


def test_every_message_type_round_trips() -> None:
    kinds = set()
    for message, data in zip(MESSAGES, ENCODED, strict=True):
        assert data[0] == VERSION
        back = decode(data)
        assert back == message
        assert encode(back) == data
        kinds.add(type(message))
    assert len(kinds) == 12


def test_masked_input_round_trips_its_vector() -> None:
    vec = np.array([0, 1, (1 << 40) - 1], dtype=np.uint64)
    m = MaskedInput(7, b"r", 40, vec)
    back = decode(encode(m))
    assert isinstance(back, MaskedInput)
    np.testing.assert_array_equal(back.vector, vec)
    assert back.vector.dtype == np.uint64


def test_direction_is_checked() -> None:
    server_bound = [d for m, d in zip(MESSAGES, ENCODED, strict=True) if hasattr(m, "sender")]
    client_bound = [d for m, d in zip(MESSAGES, ENCODED, strict=True) if hasattr(m, "recipient")]
    with pytest.raises(InvalidMessage):
        decode_server_message(server_bound[0])
    with pytest.raises(InvalidMessage):
        decode_client_message(client_bound[0])


@pytest.mark.parametrize("index", range(0, len(ENCODED), 3))
def test_truncated_and_padded_messages_are_refused(index: int) -> None:
    data = ENCODED[index]
    for cut in sorted({1, 2, len(data) // 2, len(data) - 1}):
        with pytest.raises(InvalidMessage):
            decode(data[:cut])
    with pytest.raises(InvalidMessage):
        decode(data + b"\x00")
    with pytest.raises(InvalidMessage):
        decode(bytes([VERSION + 1]) + data[1:])


def test_entries_outside_the_ring_are_refused() -> None:
    data = bytearray(encode(MaskedInput(1, b"r", 20, np.array([5], dtype=np.uint32))))
    data[-1] = 0xFF  # the top byte of the only entry: now >= 2**20
    with pytest.raises(InvalidMessage):
        decode(bytes(data))


def test_a_forged_count_cannot_make_the_parser_allocate() -> None:
    data = bytearray(ENCODED[0][:2])  # AdvertiseRequest header
    data += (0).to_bytes(8, "little") + (1).to_bytes(4, "little") + b"r"
    data += (0xFFFFFFFF).to_bytes(4, "little")  # four billion client ids follow ... not
    with pytest.raises(InvalidMessage):
        decode(bytes(data))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=300))
def test_random_bytes_give_only_typed_errors(data: bytes) -> None:
    for parse in (decode, decode_server_message, decode_client_message):
        try:
            parse(data)
        except TYPED:
            pass
    for blob in (bytes([VERSION]) + data, bytes([VERSION, data[0] if data else 0]) + data):
        try:
            decode(blob)
        except TYPED:
            pass


@settings(max_examples=200, deadline=None, derandomize=True)
@given(index=st.integers(0, len(ENCODED) - 1), flips=st.lists(st.integers(0, 10**6), max_size=4))
def test_mutated_messages_give_only_typed_errors(index: int, flips: list[int]) -> None:
    data = bytearray(ENCODED[index])
    for f in flips:
        data[f % len(data)] ^= 1 + (f >> 20) % 255
    try:
        decode(bytes(data))
    except TYPED:
        pass


@settings(max_examples=60, deadline=None, derandomize=True)
@given(index=st.integers(0, len(ENCODED) - 1), flip=st.integers(0, 10**6))
def test_machines_fed_mutated_bytes_raise_only_library_errors(index: int, flip: int) -> None:
    data = bytearray(ENCODED[index])
    data[flip % len(data)] ^= 0x41
    client = SecAggClient(0)
    try:
        client.receive_bytes(bytes(data))
    except FedcoreError:
        pass
    server = SecAggServer(make_world(3, threshold=2, seed=32).config)
    server.start()
    try:
        server.receive_bytes(0, bytes(data))
    except (InvalidMessage, RemoteProtocolError):
        pass
