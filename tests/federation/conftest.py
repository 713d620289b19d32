"""An in-memory Grid that plays sites with the real ClientApp handlers, or misbehaving ones."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import clients.app as client_app
from fedcore.config import Settings, resolve
from fedcore.federation import messages as m
from fedcore.federation.site.folders import SIMULATION_MARKER

Behaviour = Callable[[Message, Context], Message | None]


@pytest.fixture(autouse=True)
def simulated_sites(monkeypatch):
    """The in-memory grid stands for fedcore's simulation: sites may keep their state under the
    run record (a deployed site needs the node config's ``state-dir``)."""
    monkeypatch.setenv(SIMULATION_MARKER, "1")


@pytest.fixture(autouse=True)
def flower_identity():
    """Flower's Message needs a task identity in the process, as its runtimes set one."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def honest(msg: Message, context: Context) -> Message:
    """A site running fedcore's ClientApp, mods included, as Flower calls it."""
    return client_app.app(msg, context)


def _replace_arrays(
    msg: Message, context: Context, mutate: Callable[[dict], None]
) -> Message | None:
    reply = honest(msg, context)
    if msg.metadata.message_type != "train":
        return reply
    arrays = {k: v.numpy().copy() for k, v in reply.content[m.ARRAYS].items()}
    mutate(arrays)
    content = RecordDict(
        {
            m.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            m.METRICS: reply.content[m.METRICS],
        }
    )
    return Message(content=content, reply_to=msg)


def nan_update(msg, context):
    return _replace_arrays(
        msg, context, lambda a: a[next(iter(a))].__setitem__((0,) * a[next(iter(a))].ndim, np.nan)
    )


def inf_update(msg, context):
    return _replace_arrays(msg, context, lambda a: a[next(iter(a))].fill(np.inf))


def wrong_shape(msg, context):
    def mutate(a):
        key = next(iter(a))
        a[key] = np.zeros((3, 3), dtype=np.float32)

    return _replace_arrays(msg, context, mutate)


def silent(msg, context):
    return None


def raises_config_error_in_train(msg, context):
    """A site whose data cannot be read: the ClientApp turns it into an error reply."""
    if msg.metadata.message_type == "train":
        bad = Context(
            run_id=1,
            node_id=context.node_id,
            node_config={"partition-id": 999},
            state=RecordDict(),
            run_config=context.run_config,
        )
        return client_app.train(msg, bad)
    return honest(msg, context)


class FakeGrid:
    """Implements the two Grid calls fedcore's driver makes, with one behaviour per node."""

    def __init__(self, settings: Settings, behaviours: dict[int, Behaviour]):
        self.behaviours = behaviours
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": len(behaviours)},
                state=RecordDict(),
                run_config=settings.to_run_config(),
            )
            for i, node in enumerate(behaviours)
        }
        self.exchanges = 0

    def get_node_ids(self):
        return list(self.behaviours)

    def send_and_receive(self, messages, *, timeout):
        self.exchanges += 1
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            reply = self.behaviours[node](msg, self.contexts[node])
            if reply is not None:
                replies.append(reply)
        return replies


@pytest.fixture
def small_settings():
    return resolve(overrides=["sites=3", "rounds=2", "local_epochs=1", "round_timeout=5"])


@pytest.fixture
def counted_training(monkeypatch):
    """The ClientApp's local training, counted: one entry per call of ``train_round``."""
    calls = []
    real = client_app.train_round

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(client_app, "train_round", counting)
    return calls
