"""A secure-aggregation stage as a site answers it from a Flower message: the site's own rules
around the protocol, so that the ClientApp (``clients/app.py``) holds none.

The rules, each kept here once:

1. With record-level DP, a site opens (or creates) its ledger before enrolment creates its key: a
   key without a ledger reads as a lost ledger (``LedgerLostError``), so a new site makes its
   ledger first.
2. At the advertise stage a site that cannot afford a round declines before it joins (the same
   declined reply as without secure aggregation), so it never trains for a round it cannot pay.
3. The site trains through the wrapped train handler only when the protocol asks for its input
   (:func:`fedcore.federation.site.secagg.answer_stage`, after every check); a declined or failed
   training becomes a typed error, and the model's size is read from the request before training.
4. The site's floors come from the operator's node config; the run config's
   ``secagg.allow_unsafe`` lowers them only in simulation (where the same person writes both).
   So does the bound on rounds abandoned after the reveal (``secagg-max-abandoned-per-run``,
   ``secagg-max-abandoned-per-day``; :mod:`fedcore.federation.site.abandoned`).

A :class:`~fedcore.errors.FedcoreError` becomes an error reply for this one site.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedcore.config import Settings, from_run_config
from fedcore.data import SiteData
from fedcore.errors import BudgetExceededError, FedcoreError, RemoteProtocolError
from fedcore.federation import messages as m
from fedcore.federation.site import registry as secagg_registry
from fedcore.federation.site import secagg as secagg_site
from fedcore.federation.site.abandoned import abandon_limits
from fedcore.federation.site.data import site_data
from fedcore.federation.site.folders import (
    affordability,
    is_simulated,
    site_ledger,
    site_state_dir,
)
from fedcore.federation.site.store import SiteStore
from fedcore.protections import protections_of

Handler = Callable[[Message, Context], Message]


class _Trainer:
    """The wrapped train handler as a :class:`~fedcore.federation.site.secagg.Trainer`; keeps the
    site epsilon the handler reported, for the reply's metrics."""

    def __init__(self, msg: Message, context: Context, call_next: Handler) -> None:
        self.msg, self.context, self.call_next = msg, context, call_next
        self.site_epsilon: float | None = None
        self.site_charges: int | None = None

    def size(self) -> int:
        arrays, _ = m.instruction(self.msg)
        return sum(int(np.prod(arrays[k].shape)) for k in arrays.keys())

    def __call__(self) -> secagg_site.TrainedUpdate:
        reply = self.call_next(self.msg, self.context)
        if reply.has_error():
            raise RemoteProtocolError(f"local training failed: {reply.error.reason}")
        if (reason := m.declined_reason(reply)) is not None:
            raise BudgetExceededError(reason)
        if (eps := m.site_epsilon(reply)) is not None:
            self.site_epsilon = eps[1]
            self.site_charges = m.site_charges(reply)
        global_arrays, _ = m.instruction(self.msg)
        return secagg_site.trained_update(
            m.arrays_of(reply), global_arrays, reply.content.metric_records[m.METRICS]
        )


def site_party(settings: Settings, context: Context, site: SiteData) -> secagg_site.SiteParty:
    """This site as a secure-aggregation party: its files, registry, floors and identity."""
    store = SiteStore(site_state_dir(settings, context.node_config), site.site_id)
    return secagg_site.SiteParty(
        client_id=context.node_id,
        store=store,
        registry=secagg_registry.registry_dir(settings, context.node_config),
        floors=secagg_site.site_floors(
            context.node_config,
            allow_unsafe=settings.secagg.allow_unsafe and is_simulated(context.node_config),
        ),
        identity=secagg_registry.site_identity(settings, context.node_config, store),
        run_id=str(context.run_id),
        abandon=abandon_limits(context.node_config),
        distributed=protections_of(settings).distributed,
    )


def serve_stage(msg: Message, context: Context, call_next: Handler) -> Message:
    """Answer a secure-aggregation stage (a Flower mod: messages without a ``secagg`` record go
    straight to ``call_next``, the train handler)."""
    request = msg.content.config_records.get(secagg_site.SECAGG)
    if request is None:
        return call_next(msg, context)
    try:
        settings = from_run_config(context.run_config)
        site = site_data(settings, context.node_config)
        stage = request.get("stage")
        if stage == secagg_site.ENROL and protections_of(settings).record is not None:
            site_ledger(settings, site_id=site.site_id, node_config=context.node_config)  # rule 1
        if stage == "advertise":  # rule 2
            declined = affordability(settings, site, node_config=context.node_config)
            if declined is not None:
                return m.declined_reply(
                    msg,
                    site_id=site.site_id,
                    site_epsilon=declined.site_epsilon,
                    reason=declined.reason,
                    site_charges=declined.site_charges,
                )
        trainer = _Trainer(msg, context, call_next)
        answer = secagg_site.answer_stage(
            request, party=site_party(settings, context, site), state=context.state, train=trainer
        )
    except FedcoreError as exc:
        return m.error_reply(msg, exc)
    content = RecordDict({secagg_site.SECAGG: ConfigRecord({"payload": answer})})
    if trainer.site_epsilon is not None:
        spend = {m.SITE_ID: site.site_id, m.SITE_EPSILON: trainer.site_epsilon}
        if trainer.site_charges is not None:
            spend[m.SITE_CHARGES] = trainer.site_charges
        content[m.METRICS] = MetricRecord(spend)
    return Message(content=content, reply_to=msg)
