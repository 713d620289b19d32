"""fedcore's ClientApp: a thin adapter between Flower messages and :mod:`fedcore.federation.site.rounds`.

Each handler reads the run's settings from ``context.run_config`` and the site's data from
``context.node_config`` (:mod:`fedcore.federation.site.data`), calls the library,
and wraps the result in a reply. A :class:`~fedcore.errors.FedcoreError` becomes a Flower error
reply for this one site, so the round goes on with the others.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcore.config import from_run_config
from fedcore.errors import FedcoreError
from fedcore.federation import messages as m
from fedcore.federation.simulation import batched
from fedcore.federation.site import release as site_release
from fedcore.federation.site.data import site_data
from fedcore.federation.site.folders import SiteDeclined
from fedcore.federation.site.rounds import evaluate_round, train_round
from fedcore.federation.site.stage import serve_stage

FEDCORE_ERROR_CODE = m.FEDCORE_ERROR_CODE  # re-exported: the code of a FedcoreError reply

app = ClientApp()

Handler = Callable[[Message, Context], Message]


def _replies_with_errors(handler: Handler) -> Handler:
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except FedcoreError as exc:
            return m.error_reply(msg, exc)

    return wrapped


@app.train()
@_replies_with_errors
def train(msg: Message, context: Context) -> Message:
    return batched.dispatch(msg, context, train_one)  # one site, or a node playing many


def train_one(msg: Message, context: Context) -> Message:
    """One site's train message: a secure-aggregation stage, answered by the site package
    (:mod:`fedcore.federation.site.stage`), or else its local training (:func:`train_site`)."""
    return serve_stage(msg, context, train_site)


@_replies_with_errors
def train_site(msg: Message, context: Context) -> Message:
    arrays, config = m.instruction(msg)
    server_round, num_classes, input_shape = m.read_train_config(config)
    settings = from_run_config(context.run_config)
    site = site_data(settings, context.node_config)
    outcome = train_round(
        settings,
        site=site,
        global_state=m.record_to_state(arrays),
        num_classes=num_classes,
        input_shape=input_shape,
        server_round=server_round,
        node_config=context.node_config,
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
        release=site_release.release_key(msg, settings),
    )
    if isinstance(outcome, SiteDeclined):
        return m.declined_reply(
            msg,
            site_id=site.site_id,
            site_epsilon=outcome.site_epsilon,
            reason=outcome.reason,
            site_charges=outcome.site_charges,
        )
    return m.train_reply(
        msg,
        outcome.state,
        num_examples=outcome.num_examples,
        loss=outcome.train_loss,
        site_id=site.site_id,
        site_epsilon=outcome.site_epsilon,
        site_charges=outcome.site_charges,
    )


@app.evaluate()
@_replies_with_errors
def evaluate(msg: Message, context: Context) -> Message:
    return batched.dispatch(msg, context, evaluate_site)


@_replies_with_errors
def evaluate_site(msg: Message, context: Context) -> Message:
    arrays, config = m.instruction(msg)
    _, num_classes, input_shape = m.read_train_config(config)
    settings = from_run_config(context.run_config)
    result = evaluate_round(
        settings,
        site=site_data(settings, context.node_config),
        global_state=m.record_to_state(arrays),
        num_classes=num_classes,
        input_shape=input_shape,
    )
    return m.evaluate_reply(
        msg, num_examples=result.num_examples, loss=result.loss, accuracy=result.accuracy
    )
