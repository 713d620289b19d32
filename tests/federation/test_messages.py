import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedcore.errors import RemoteProtocolError
from fedcore.federation import messages as m

REFERENCE = ArrayRecord(
    {"w": Array(np.zeros((2, 3), np.float32)), "b": Array(np.zeros(3, np.float32))}
)


def _reply(arrays, metrics):
    content = RecordDict(
        {
            m.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            m.METRICS: MetricRecord(metrics),
        }
    )
    request = Message(content=RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN)
    return Message(content=content, reply_to=request)


GOOD = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}


def test_good_reply_passes():
    m.check_train_reply(_reply(GOOD, {m.NUM_EXAMPLES: 5}), REFERENCE)


@pytest.mark.parametrize(
    ("arrays", "metrics", "fragment"),
    [
        (
            {**GOOD, "w": np.full((2, 3), np.nan, np.float32)},
            {m.NUM_EXAMPLES: 5},
            "NaN or infinite",
        ),
        (
            {**GOOD, "b": np.array([1, np.inf, 0], np.float32)},
            {m.NUM_EXAMPLES: 5},
            "NaN or infinite",
        ),
        ({**GOOD, "w": np.ones((3, 2), np.float32)}, {m.NUM_EXAMPLES: 5}, "expected float32[2, 3]"),
        ({**GOOD, "w": np.ones((2, 3), np.float64)}, {m.NUM_EXAMPLES: 5}, "expected float32"),
        ({"w": GOOD["w"]}, {m.NUM_EXAMPLES: 5}, "missing ['b']"),
        ({**GOOD, "x": np.ones(1, np.float32)}, {m.NUM_EXAMPLES: 5}, "unexpected ['x']"),
        ({}, {m.NUM_EXAMPLES: 5}, "missing"),
        (GOOD, {m.NUM_EXAMPLES: 0}, "positive integer"),
        (GOOD, {m.NUM_EXAMPLES: 2.5}, "positive integer"),
        (GOOD, {"other": 1}, "positive integer"),
    ],
)
def test_bad_replies_are_refused_with_reason(arrays, metrics, fragment):
    with pytest.raises(RemoteProtocolError) as info:
        m.check_train_reply(_reply(arrays, metrics), REFERENCE)
    assert fragment in str(info.value)


def test_reply_without_records_is_refused():
    request = Message(content=RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN)
    with pytest.raises(RemoteProtocolError, match="must hold records"):
        m.check_train_reply(
            Message(content=RecordDict({"config": ConfigRecord({"a": 1})}), reply_to=request),
            REFERENCE,
        )


def test_malformed_train_config_is_a_protocol_error():
    with pytest.raises(RemoteProtocolError):
        m.read_train_config(ConfigRecord({"server-round": 1}))
    assert m.read_train_config(
        m.train_config(server_round=2, num_classes=3, input_shape=(1, 8, 8))
    ) == (2, 3, (1, 8, 8))


def _forged(values: np.ndarray, *, claims=("float32", (2, 3))) -> Array:
    """An array whose metadata claims ``claims`` but whose bytes are ``values`` encoded by numpy
    (header and all): what a dishonest site can send."""
    encoded = Array(values).data
    return Array(dtype=claims[0], shape=claims[1], stype="numpy.ndarray", data=encoded)


def _reply_with(array_w: Array):
    content = RecordDict(
        {
            m.ARRAYS: ArrayRecord({"w": array_w, "b": Array(GOOD["b"])}),
            m.METRICS: MetricRecord({m.NUM_EXAMPLES: 5}),
        }
    )
    request = Message(content=RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN)
    return Message(content=content, reply_to=request)


def test_values_read_in_place_are_still_checked():
    """Bytes with the reference's own header are read without parsing it: NaN is still found."""
    with pytest.raises(RemoteProtocolError, match="NaN or infinite"):
        m.check_train_reply(_reply_with(_forged(np.full((2, 3), np.nan, np.float32))), REFERENCE)


def test_bytes_whose_header_disagrees_with_the_metadata_are_not_read_in_place():
    """A site claims float32[2, 3] but sends the same number of bytes as float64[3] holding NaN
    (or as another header altogether): the header is parsed, and the NaN found."""
    forged = _forged(np.array([np.nan, 0.0, 0.0], np.float64))
    assert len(forged.data) == len(REFERENCE["w"].data)
    with pytest.raises(RemoteProtocolError, match="NaN or infinite"):
        m.check_train_reply(_reply_with(forged), REFERENCE)


def test_garbage_bytes_of_the_right_length_are_refused():
    garbage = Array(
        dtype="float32",
        shape=(2, 3),
        stype="numpy.ndarray",
        data=bytes(range(256))[: len(REFERENCE["w"].data)],
    )
    with pytest.raises(RemoteProtocolError, match="could not be decoded"):
        m.check_train_reply(_reply_with(garbage), REFERENCE)
