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


def test_bytes_whose_header_disagrees_with_the_metadata_are_refused_even_when_finite():
    """The metadata claims float32[2, 3]; the bytes are a finite float64[3] of the same length:
    what would reach the aggregate is not what the metadata promised, so the reply is refused."""
    forged = _forged(np.array([1.0, 2.0, 3.0], np.float64))
    assert len(forged.data) == len(REFERENCE["w"].data)
    with pytest.raises(RemoteProtocolError, match=r"its bytes hold float64\[3\]"):
        m.check_train_reply(_reply_with(forged), REFERENCE)


def _replies(seed: int, count: int = 3) -> list[Message]:
    rng = np.random.default_rng(seed)
    return [
        _reply(
            {
                "w": rng.standard_normal((2, 3)).astype(np.float32),
                "b": rng.standard_normal(3).astype(np.float32),
            },
            {m.NUM_EXAMPLES: int(rng.integers(1, 50))},
        )
        for _ in range(count)
    ]


def _fedavg(replies: list[Message]) -> dict[str, np.ndarray]:
    from flwr.serverapp.strategy import FedAvg

    aggregated, _ = FedAvg().aggregate_train(1, replies)
    assert aggregated is not None
    return {k: a.numpy() for k, a in aggregated.items()}


def test_a_checked_reply_hands_the_checked_values_to_the_aggregate():
    """The aggregate of checked replies equals, bit for bit, Flower's own (every array decoded
    again with np.load), and bytes altered after the check (NaN here) cannot reach it."""
    checked, pristine = _replies(seed=7), _replies(seed=7)
    for reply in checked:
        m.check_train_reply(reply, REFERENCE)
    arrays = m.arrays_of(checked[0])
    assert all(isinstance(a, m.CheckedArray) for a in arrays.values())
    assert not arrays["w"].numpy().flags.writeable
    expected = _fedavg(pristine)
    arrays["w"].data = Array(np.full((2, 3), np.nan, np.float32)).data  # after the check
    got = _fedavg(checked)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype
        assert np.array_equal(got[key], value)
    assert np.isfinite(got["w"]).all()


def test_a_refused_reply_keeps_its_arrays_unchecked():
    """Only a reply that passes every check gets CheckedArrays (a NaN in one array refuses it
    whole, and none of its arrays is marked as checked)."""
    reply = _reply({**GOOD, "b": np.array([1, np.nan, 0], np.float32)}, {m.NUM_EXAMPLES: 5})
    with pytest.raises(RemoteProtocolError):
        m.check_train_reply(reply, REFERENCE)
    assert not any(isinstance(a, m.CheckedArray) for a in m.arrays_of(reply).values())


@pytest.mark.parametrize(
    "values",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.full((), 2.5),
        np.arange(5, dtype=np.int64),
        np.zeros((0, 3), np.float32),
        np.array([True, False]),
        np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not C-ordered: np.save's own path
    ],
)
def test_encode_array_writes_the_bytes_array_writes(values):
    """The cached-header encoding is Flower's ``Array(ndarray)`` byte for byte, and decodes back."""
    fast, flower = m.encode_array(values), Array(values)
    assert (fast.dtype, fast.shape, fast.stype, fast.data) == (
        flower.dtype,
        flower.shape,
        flower.stype,
        flower.data,
    )
    assert np.array_equal(fast.numpy(), values)


def test_state_to_record_matches_flowers_own_encoding():
    import torch

    torch.manual_seed(0)
    state = torch.nn.Linear(4, 3).state_dict()
    ours, flower = m.state_to_record(state), ArrayRecord(state)
    assert list(ours.keys()) == list(flower.keys())
    assert all(ours[k] == flower[k] for k in flower.keys())
