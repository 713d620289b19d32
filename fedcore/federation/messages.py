"""What travels in a fedcore Flower message, and the checks a reply must pass.

A train instruction carries ``arrays`` (the global model, an ``ArrayRecord``) and ``config`` (a
``ConfigRecord`` with ``server-round``, ``num-classes``, ``input-shape`` and ``fedcore-run-id``, the
run record's identity, the same after a resume: :attr:`fedcore.runrecord.RecordWriter.run_id`). A train reply carries
``arrays`` (the site's new weights) and ``metrics`` (a ``MetricRecord`` with ``num-examples`` and
``train_loss`` (except under record-level DP, which does not cover it), plus ``site-id`` and, under
record-level DP, ``site_epsilon``). A site that cannot
afford a round under its privacy budget sends a *declined* reply instead: ``metrics`` with
``declined = 1``, ``site-id`` and ``site_epsilon``, and a ``status`` config record with the reason.
An evaluate reply carries ``metrics`` with ``num-examples``, ``eval_loss`` and ``eval_accuracy``.

A reply from a site is untrusted input: :func:`check_train_reply` refuses a missing record, missing
or extra arrays, a wrong shape or dtype, a NaN or infinite value, or a bad example count, with
:class:`~fedcore.errors.RemoteProtocolError`, so the driver can drop that one site and go on. A reply
that passes carries :class:`CheckedArray` objects from then on: the strategy averages the very
values that were checked, without decoding the bytes again.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SType

from fedcore.errors import FedcoreError, RemoteProtocolError

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"
STATUS = "status"
SITE_ID = "site-id"
SITE_EPSILON = "site_epsilon"
SITE_CHARGES = "site_charges"  # how many entries the site's ledger holds (receipts)
DECLINED = "declined"
RUN_ID = "fedcore-run-id"
SECAGG = "secagg"  # the record that carries a secure-aggregation stage, in requests and replies
RUN_ID_PATTERN = re.compile(r"[0-9a-f]{32}")  # what RecordWriter makes: secrets.token_hex(16)

_R = TypeVar("_R", ArrayRecord, ConfigRecord, MetricRecord)


def record_of(content: RecordDict, key: str, kind: type[_R]) -> _R | None:
    """``content[key]`` if it is a ``kind`` record, else None: what ``content.metric_records``
    (``array_records``, ``config_records``) ``.get(key)`` gives, without Flower building a
    type-checked copy of every record of ``content`` on each call (dozens of calls per site and
    round, measurable at hundreds of sites)."""
    record = content.get(key)
    return record if isinstance(record, kind) else None


def metrics_of(reply: Message) -> MetricRecord:
    """The ``metrics`` record of a checked reply (KeyError without one)."""
    metrics = record_of(reply.content, METRICS, MetricRecord)
    if metrics is None:
        raise KeyError(METRICS)
    return metrics


def metric(reply: Message, key: str) -> float:
    """A number from a checked reply's ``metrics`` record."""
    value = metrics_of(reply)[key]
    if not isinstance(value, int | float):
        raise RemoteProtocolError(f"metric {key!r} must be a number, got {value!r}")
    return float(value)


def arrays_of(reply: Message) -> ArrayRecord:
    """The ``arrays`` record of a checked train reply."""
    arrays = record_of(reply.content, ARRAYS, ArrayRecord)
    if arrays is None:
        raise KeyError(ARRAYS)
    return arrays


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A model ``state_dict`` as an ``ArrayRecord`` (detached, on the CPU)."""
    return ArrayRecord(
        array_dict={k: encode_array(v.detach().cpu().numpy()) for k, v in state.items()}
    )


def encode_array(values: np.ndarray) -> Array:
    """``Array(values)``, the same bytes, without ``np.save`` building the ``.npy`` header anew for
    every array (a site encodes its whole model every round: ~30 us an array). The header of a
    C-ordered array depends only on its dtype and shape, so it is made once per pair, by
    ``np.save`` itself (:func:`_npy_header`); other arrays go through ``Array(values)``."""
    if not values.flags.c_contiguous or values.dtype.hasobject:
        return Array(values)
    shape = tuple(values.shape)
    return Array(
        dtype=str(values.dtype),
        shape=shape,
        stype=SType.NUMPY,
        data=_npy_header(values.dtype, shape) + values.tobytes(),
    )


@functools.lru_cache(maxsize=1024)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """What ``np.save`` writes before the data of a C-ordered array of ``dtype`` and ``shape``."""
    data = Array(np.zeros(shape, dtype)).data
    return data[: len(data) - math.prod(shape) * dtype.itemsize]


# Inside decoded_once(): id(record) -> (record, its decoded state), so that the sites one simulated
# node plays decode the global model they share once, not once each.
_DECODED: ContextVar[dict[int, tuple[ArrayRecord, dict[str, torch.Tensor]]] | None] = ContextVar(
    "fedcore_decoded", default=None
)


@contextmanager
def decoded_once() -> Iterator[None]:
    """Inside, :func:`record_to_state` decodes each ``ArrayRecord`` object once (the records must
    not change meanwhile); every call still returns tensors of its own."""
    token = _DECODED.set({})
    try:
        yield
    finally:
        _DECODED.reset(token)


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ``ArrayRecord`` back to a ``state_dict`` of CPU tensors."""
    cache = _DECODED.get()
    if cache is None:
        return record.to_torch_state_dict()
    hit = cache.get(id(record))
    if hit is None or hit[0] is not record:
        hit = cache[id(record)] = (record, record.to_torch_state_dict())
    return {key: tensor.clone() for key, tensor in hit[1].items()}


def content_bytes(message: Message) -> int:
    """Bytes of a message's payload: every array's data plus the keys and scalar records."""
    if not message.has_content():
        return 0
    return sum(record.count_bytes() for record in message.content.values())


def train_config(
    *,
    server_round: int,
    num_classes: int,
    input_shape: tuple[int, ...],
    run_id: str | None = None,
) -> ConfigRecord:
    """The config of a train/evaluate instruction; ``run_id``: the fedcore run's identity."""
    config = ConfigRecord(
        {
            "server-round": server_round,
            "num-classes": num_classes,
            "input-shape": json.dumps(list(input_shape)),
        }
    )
    if run_id is not None:
        config[RUN_ID] = run_id
    return config


def instruction(message: Message) -> tuple[ArrayRecord, ConfigRecord]:
    """The global model and config of a train or evaluate instruction from the server."""
    arrays = record_of(message.content, ARRAYS, ArrayRecord)
    config = record_of(message.content, CONFIG, ConfigRecord)
    if arrays is None or config is None:
        raise RemoteProtocolError(
            f"an instruction must hold records {ARRAYS!r} and {CONFIG!r}, got {sorted(message.content.keys())}"
        )
    return arrays, config


def read_train_config(config: ConfigRecord) -> tuple[int, int, tuple[int, ...]]:
    """``(server_round, num_classes, input_shape)`` from a train/evaluate instruction."""
    try:
        server_round = int(config["server-round"])  # type: ignore[arg-type]
        num_classes = int(config["num-classes"])  # type: ignore[arg-type]
        input_shape = tuple(int(s) for s in json.loads(str(config["input-shape"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise RemoteProtocolError(f"malformed train config from the server: {exc!r}") from exc
    return server_round, num_classes, input_shape


def read_run_id(config: ConfigRecord) -> str | None:
    """The fedcore run id of an instruction (None if the server sent none); a malformed one is a
    :class:`RemoteProtocolError` (it names a file on the site's disk)."""
    value = config.get(RUN_ID)
    if value is None:
        return None
    if not isinstance(value, str) or RUN_ID_PATTERN.fullmatch(value) is None:
        raise RemoteProtocolError(
            f"{RUN_ID!r} must be 32 lowercase hex digits, got {str(value)[:80]!r}"
        )
    return value


def train_reply(
    message: Message,
    state: Mapping[str, torch.Tensor],
    *,
    num_examples: int,
    loss: float | None,
    site_id: int,
    site_epsilon: float | None = None,
    site_charges: int | None = None,
) -> Message:
    metrics = MetricRecord({NUM_EXAMPLES: num_examples, SITE_ID: site_id})
    if loss is not None:  # a DP-SGD site does not send its loss: the guarantee does not cover it
        metrics["train_loss"] = loss
    if site_epsilon is not None:
        metrics[SITE_EPSILON] = site_epsilon
    if site_charges is not None:
        metrics[SITE_CHARGES] = site_charges
    return Message(
        content=RecordDict({ARRAYS: state_to_record(state), METRICS: metrics}), reply_to=message
    )


def declined_reply(
    message: Message,
    *,
    site_id: int,
    site_epsilon: float,
    reason: str,
    site_charges: int | None = None,
) -> Message:
    """The reply of a site that will not train this round (its privacy budget would be passed)."""
    metrics = MetricRecord({DECLINED: 1, SITE_ID: site_id, SITE_EPSILON: site_epsilon})
    if site_charges is not None:
        metrics[SITE_CHARGES] = site_charges
    content = RecordDict(
        {
            METRICS: metrics,
            STATUS: ConfigRecord({"reason": reason}),
        }
    )
    return Message(content=content, reply_to=message)


def declined_reason(reply: Message) -> str | None:
    """The reason a site declined, or None if ``reply`` is not a decline."""
    if reply.has_error():
        return None
    metrics = record_of(reply.content, METRICS, MetricRecord)
    if metrics is None or metrics.get(DECLINED) != 1:
        return None
    status = record_of(reply.content, STATUS, ConfigRecord)
    return str(status.get("reason", "declined")) if status is not None else "declined"


def site_epsilon(reply: Message) -> tuple[int, float] | None:
    """``(site id, epsilon)`` a site reported in ``reply``, if it reported both as finite numbers."""
    if reply.has_error():
        return None
    metrics = record_of(reply.content, METRICS, MetricRecord)
    if metrics is None:
        return None
    site, eps = metrics.get(SITE_ID), metrics.get(SITE_EPSILON)
    if (
        not isinstance(site, int | float)
        or not isinstance(eps, int | float)
        or not math.isfinite(eps)
    ):
        return None
    return int(site), float(eps)


def site_charges(reply: Message) -> int | None:
    """How many entries the site's ledger holds, as it reported in ``reply`` (None if not)."""
    if reply.has_error():
        return None
    metrics = record_of(reply.content, METRICS, MetricRecord)
    charges = metrics.get(SITE_CHARGES) if metrics is not None else None
    if isinstance(charges, bool) or not isinstance(charges, int | float) or charges != charges:
        return None
    return int(charges)


def evaluate_reply(message: Message, *, num_examples: int, loss: float, accuracy: float) -> Message:
    metrics = MetricRecord(
        {NUM_EXAMPLES: num_examples, "eval_loss": loss, "eval_accuracy": accuracy}
    )
    return Message(content=RecordDict({METRICS: metrics}), reply_to=message)


def check_train_reply(reply: Message, reference: ArrayRecord) -> None:
    """Raise :class:`RemoteProtocolError` unless ``reply`` is a usable train reply.

    ``reference`` is the global model that was sent: the reply must hold exactly its keys, with
    the same shapes and dtypes, and only finite values. A reply that passes has its arrays
    replaced by :class:`CheckedArray` objects, whose ``numpy()`` is the values checked here.
    """
    content = reply.content
    arrays = record_of(content, ARRAYS, ArrayRecord)
    metrics = record_of(content, METRICS, MetricRecord)
    if arrays is None or metrics is None:
        raise RemoteProtocolError(
            f"train reply must hold records {ARRAYS!r} and {METRICS!r}, got {sorted(content.keys())}"
        )
    if set(arrays.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference.keys()))
        raise RemoteProtocolError(f"update has wrong arrays: missing {missing}, unexpected {extra}")
    checked: dict[str, CheckedArray] = {}
    for key, ref in reference.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            raise RemoteProtocolError(
                f"array {key!r}: expected {ref.dtype}{list(ref.shape)}, got {got.dtype}{list(got.shape)}"
            )
        try:
            values = _decode_like(got, ref)
        except Exception as exc:  # noqa: BLE001 - any decode failure of peer bytes
            raise RemoteProtocolError(f"array {key!r} could not be decoded: {exc}") from exc
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise RemoteProtocolError(f"array {key!r} holds NaN or infinite values")
        if values.shape != tuple(ref.shape) or values.dtype != np.dtype(ref.dtype):
            # bytes whose own .npy header disagrees with the array's metadata
            raise RemoteProtocolError(
                f"array {key!r}: its bytes hold {values.dtype}{list(values.shape)}, "
                f"its metadata says {got.dtype}{list(got.shape)}"
            )
        checked[key] = CheckedArray.of(got, values)
    count = metrics.get(NUM_EXAMPLES)
    if (
        not isinstance(count, int | float)
        or not math.isfinite(count)
        or count <= 0
        or count != int(count)
    ):
        raise RemoteProtocolError(f"{NUM_EXAMPLES!r} must be a positive integer, got {count!r}")
    for key, array in checked.items():  # the reply passed: what is aggregated is what was checked
        arrays[key] = array


class CheckedArray(Array):
    """An array of a reply that passed :func:`check_train_reply`: the site's bytes as they came,
    and the values the check read from them and found finite, of the right shape and dtype.

    ``numpy()`` returns those values (read only), never the bytes decoded again: the strategy's
    aggregate (Flower's ``FedAvg`` and every strategy built on it, FedMedian, DP-FedAvg's
    clipping) gets exactly what was checked, and does not pay ``np.load`` a second time per array
    (40 us each: 24 ms a round at 100 sites of the MLP). Changing ``data`` afterwards changes what
    the bytes say, not what is aggregated."""

    @classmethod
    def of(cls, array: Array, values: np.ndarray) -> CheckedArray:
        """``array`` (already a valid Array) with its checked ``values``."""
        checked = cls.__new__(cls)
        # Flower's own idiom in Array.__init__: the dataclass fields set through __dict__.
        checked.__dict__.update(
            dtype=array.dtype, shape=array.shape, stype=array.stype, data=array.data
        )
        if values.flags.writeable:  # np.load's result; frombuffer over bytes is read only already
            values.flags.writeable = False
        checked.__dict__["_checked"] = values
        return checked

    def numpy(self) -> np.ndarray:
        """The checked values (read only)."""
        return self.__dict__["_checked"]  # type: ignore[no-any-return]


def _decode_like(got: Array, ref: Array) -> np.ndarray:
    """``got``'s values. When its bytes begin with exactly the ``.npy`` header of ``ref`` (the
    global model's array, encoded by numpy here) and have its length, they are read in place:
    what ``np.load`` would return for that header, without parsing it again (40 us an array,
    twice per site and round). Anything else goes through ``got.numpy()`` and all its checks."""
    dtype = np.dtype(ref.dtype)
    head = len(ref.data) - math.prod(ref.shape) * dtype.itemsize
    if head > 0 and len(got.data) == len(ref.data) and got.data[:head] == ref.data[:head]:
        return np.frombuffer(got.data, dtype=dtype, offset=head).reshape(tuple(ref.shape))
    return got.numpy()


def check_evaluate_reply(reply: Message) -> None:
    """Raise :class:`RemoteProtocolError` unless ``reply`` carries usable evaluation metrics."""
    metrics = record_of(reply.content, METRICS, MetricRecord)
    if metrics is None:
        raise RemoteProtocolError(f"evaluate reply must hold record {METRICS!r}")
    for key in (NUM_EXAMPLES, "eval_loss", "eval_accuracy"):
        value = metrics.get(key)
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise RemoteProtocolError(
                f"evaluate metric {key!r} must be a finite number, got {value!r}"
            )
    count = metrics[NUM_EXAMPLES]
    if not isinstance(count, int | float) or count <= 0:
        raise RemoteProtocolError(f"{NUM_EXAMPLES!r} must be positive, got {count!r}")


# Error code carried by a reply whose handler raised a FedcoreError (Flower's own codes are < 100).
FEDCORE_ERROR_CODE = 700


def error_reply(message: Message, exc: FedcoreError) -> Message:
    """The error reply for ``exc`` to ``message``, logged on the site's own console with the
    reason it sends (the round goes on with the other sites)."""
    from logging import WARNING

    from flwr.common.logger import log

    reason = f"{type(exc).__name__}: {exc}"
    log(WARNING, "fedcore site: %s request refused: %s", message.metadata.message_type, reason)
    return Message(Error(code=FEDCORE_ERROR_CODE, reason=reason), reply_to=message)
