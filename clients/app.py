"""fedcore's ClientApp: a thin adapter between Flower messages and :mod:`fedcore.federation.site.rounds`.

Each handler reads the run's settings from ``context.run_config`` and the site's data from
``context.node_config`` (:mod:`fedcore.federation.site.data`), calls the library,
and wraps the result in a reply. A :class:`~fedcore.errors.FedcoreError` becomes a Flower error
reply for this one site, so the round goes on with the others.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import WARNING

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from fedcore.config import from_run_config
from fedcore.errors import BudgetExceededError, FedcoreError, RemoteProtocolError
from fedcore.federation import messages as m
from fedcore.federation.simulation import batched
from fedcore.federation.site import registry as secagg_registry
from fedcore.federation.site import release as site_release
from fedcore.federation.site import secagg as secagg_site
from fedcore.federation.site.data import site_data
from fedcore.federation.site.folders import (
    SiteDeclined,
    affordability,
    is_simulated,
    site_ledger,
    site_state_dir,
)
from fedcore.federation.site.rounds import evaluate_round, train_round
from fedcore.federation.site.store import SiteStore
from fedcore.protections import protections_of

# Error code carried by a reply whose handler raised a FedcoreError (Flower's own codes are < 100).
FEDCORE_ERROR_CODE = 700

app = ClientApp()

Handler = Callable[[Message, Context], Message]


def _error_reply(msg: Message, exc: FedcoreError) -> Message:
    """The error reply for ``exc``, logged on this site's own console with the reason it sends."""
    reason = f"{type(exc).__name__}: {exc}"
    log(WARNING, "fedcore site: %s request refused: %s", msg.metadata.message_type, reason)
    return Message(Error(code=FEDCORE_ERROR_CODE, reason=reason), reply_to=msg)


def _replies_with_errors(handler: Handler) -> Handler:
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except FedcoreError as exc:
            return _error_reply(msg, exc)

    return wrapped


def secagg_mod(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Answer a secure-aggregation stage, training through ``call_next`` at the masked-input stage.

    Messages without a ``secagg`` record pass straight to the train handler. Protocol and privacy
    rules live in :mod:`fedcore.federation.site.secagg`; this only translates messages.
    """
    request = msg.content.config_records.get(secagg_site.SECAGG)
    if request is None:
        return call_next(msg, context)
    try:
        settings = from_run_config(context.run_config)
        site = site_data(settings, context.node_config)
        if (
            protections_of(settings).record is not None
            and request.get("stage") == secagg_site.ENROL
        ):
            # Open (or create) the ledger before enrolment creates the key: a key without a ledger
            # is a lost ledger (LedgerLostError), so a new site must make its ledger first.
            site_ledger(settings, site_id=site.site_id, node_config=context.node_config)
        if request.get("stage") == "advertise":
            declined = affordability(settings, site, node_config=context.node_config)
            if declined is not None:
                return m.declined_reply(
                    msg,
                    site_id=site.site_id,
                    site_epsilon=declined.site_epsilon,
                    reason=declined.reason,
                )
        reported: dict[str, float] = {}

        def train_now() -> secagg_site.TrainedUpdate:
            reply = call_next(msg, context)
            if reply.has_error():
                raise RemoteProtocolError(f"local training failed: {reply.error.reason}")
            if (reason := m.declined_reason(reply)) is not None:
                raise BudgetExceededError(reason)
            if (eps := m.site_epsilon(reply)) is not None:
                reported["site_epsilon"] = eps[1]
            global_arrays, _ = m.instruction(msg)
            return secagg_site.trained_update(
                m.arrays_of(reply), global_arrays, reply.content.metric_records[m.METRICS]
            )

        store = SiteStore(site_state_dir(settings, context.node_config), site.site_id)
        answer = secagg_site.answer_stage(
            request,
            client_id=context.node_id,
            store=store,
            state=context.state,
            train=train_now,
            registry=secagg_registry.registry_dir(settings, context.node_config),
            floors=secagg_site.site_floors(
                context.node_config,
                allow_unsafe=settings.secagg.allow_unsafe and is_simulated(context.node_config),
            ),
            identity=secagg_registry.site_identity(settings, context.node_config, store),
        )
    except FedcoreError as exc:
        return _error_reply(msg, exc)
    content = RecordDict({secagg_site.SECAGG: ConfigRecord({"payload": answer})})
    if reported:
        content[m.METRICS] = MetricRecord(
            {m.SITE_ID: site.site_id, m.SITE_EPSILON: reported["site_epsilon"]}
        )
    return Message(content=content, reply_to=msg)


@app.train(mods=[secagg_mod])
@_replies_with_errors
def train(msg: Message, context: Context) -> Message:
    # a simulated node playing many sites (fedcore.federation.simulation.batched)
    if batched.is_batch(msg):
        settings = from_run_config(context.run_config)
        return batched.answer_batch(msg, context, settings, train_site)
    return train_site(msg, context)


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
            msg, site_id=site.site_id, site_epsilon=outcome.site_epsilon, reason=outcome.reason
        )
    return m.train_reply(
        msg,
        outcome.state,
        num_examples=outcome.num_examples,
        loss=outcome.train_loss,
        site_id=site.site_id,
        site_epsilon=outcome.site_epsilon,
    )


@app.evaluate()
@_replies_with_errors
def evaluate(msg: Message, context: Context) -> Message:
    if batched.is_batch(msg):
        settings = from_run_config(context.run_config)
        return batched.answer_batch(msg, context, settings, evaluate_site)
    return evaluate_site(msg, context)


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
