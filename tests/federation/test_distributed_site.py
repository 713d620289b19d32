"""Distributed DP against a malicious server, through the site's real secure-aggregation handler
(its key, round journal and distributed-DP ledger on disk): the site's guarantee is its own.

- a server whose session lowers the noise makes the site charge more, or decline before training;
- a server that drops sites below the session's floor gets no unmask share from the site;
- a replayed round id is refused by the journal, and charges nothing more.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedcore.config import resolve
from fedcore.errors import BudgetExceededError, RemoteProtocolError
from fedcore.mechanisms.distributed import SiteHalf, rotation_seed, session_encoding, site_event
from fedcore.mechanisms.distributed_encoding import decode_sum
from fedcore.privacy import PrivacyLedger
from fedcore.protections import protections_of
from fedcore.secagg import SessionEncoding
from fedcore.secagg.config import ring_dtype
from fedcore.secagg.errors import TooFewSurvivors
from fedcore.secagg.messages import MaskedInputRequest, UnmaskRequest
from tests.federation.site_attack import HandlerSite, Refused, Round, session

CLIENTS = (1, 2, 3, 4)
DIM = 7  # the stub trainer's update: padded to 8 ring elements


def _mechanism(epsilon: float = 4.0):
    settings = resolve(
        overrides=[
            "sites=4",
            "rounds=2",
            "secagg.enabled=true",
            f"dp.distributed.epsilon={epsilon}",
            "dp.distributed.dropout_tolerance=0",
        ]
    )
    return protections_of(settings).distributed


@dataclasses.dataclass
class DistributedSite(HandlerSite):
    """The handler site with a distributed-DP budget (what the ClientApp gives it)."""

    mechanism: object = None

    @property
    def party(self):
        return dataclasses.replace(super().party, distributed=self.mechanism)

    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger.load(self.store.distributed_ledger_path)


def _config(mechanism, *, round_id=b"R" * 16, noise_factor=1.0, floor=None):
    """The session an honest server plans (``noise_factor`` < 1: a server that lowers the noise,
    ``floor``: one that lowers the survivor floor)."""
    plan = mechanism.plan(sites=len(CLIENTS), dim=DIM)
    bound = mechanism.session(plan, sites=len(CLIENTS))
    bound = dataclasses.replace(bound, site_noise=bound.site_noise * noise_factor)
    if floor is not None:
        bound = dataclasses.replace(
            bound, min_survivors=floor, colluders=min(bound.colluders, floor - 1)
        )
    encoding = SessionEncoding(
        clip=plan.clip_norm, max_total_weight=4, dp_clip_norm=plan.clip_norm, distributed=bound
    )
    config = session(CLIENTS, round_id=round_id, length=plan.padded_dim, encoding=encoding)
    return dataclasses.replace(config, bits=plan.bits), plan


def _through_masked_input(site, config, seed=1):
    rnd = Round(config, site.node, site.ask, seed=seed)
    while not rnd.done and not any(isinstance(r, MaskedInputRequest) for r in rnd.sent):
        rnd.step()
    return rnd


def test_the_site_charges_the_event_the_honest_plan_implies(tmp_path):
    mechanism = _mechanism()
    site = DistributedSite(tmp_path, length=8, mechanism=mechanism)
    config, plan = _config(mechanism)
    rnd = _through_masked_input(site, config)
    assert rnd.refusals == [] and site.trained == 1
    (entry,) = site.ledger().entries
    assert entry.event == plan.round_event()  # the site's own recomputation equals the plan
    assert entry.epsilon_after <= plan.epsilon  # one of the planned two rounds


def test_a_server_that_lowers_the_noise_makes_the_site_charge_more(tmp_path):
    mechanism = _mechanism()
    honest = DistributedSite(tmp_path / "honest", length=8, mechanism=mechanism)
    _through_masked_input(honest, _config(mechanism)[0])
    thin = DistributedSite(tmp_path / "thin", length=8, mechanism=mechanism)
    rnd = _through_masked_input(thin, _config(mechanism, noise_factor=0.9)[0])
    assert rnd.refusals == [] and thin.trained == 1
    assert thin.ledger().epsilon() > honest.ledger().epsilon() * 1.05
    floor = DistributedSite(tmp_path / "floor", length=8, mechanism=mechanism)
    _through_masked_input(floor, _config(mechanism, floor=3)[0])  # fewer honest noisers
    assert floor.ledger().epsilon() > honest.ledger().epsilon()


def test_a_site_declines_before_training_when_its_budget_cannot_afford_the_session(tmp_path):
    mechanism = _mechanism()
    site = DistributedSite(tmp_path, length=8, mechanism=mechanism)
    rnd = _through_masked_input(site, _config(mechanism, noise_factor=0.05)[0])
    assert site.trained == 0  # stopped before training
    assert len(rnd.refusals) == 1 and "BudgetExceededError" in rnd.refusals[0]
    assert site.ledger().entries == ()  # nothing charged
    assert not any(isinstance(a, type(None)) for a in rnd.answers)


def test_a_site_without_a_distributed_budget_refuses_the_session(tmp_path):
    site = DistributedSite(tmp_path, length=8, mechanism=None)
    rnd = _through_masked_input(site, _config(_mechanism())[0])
    assert site.trained == 0 and "no distributed-DP budget" in rnd.refusals[0]


def test_a_server_that_drops_sites_below_the_floor_gets_no_unmask_share(tmp_path):
    mechanism = _mechanism()  # tolerance 0: the floor is every one of the 4 sites
    site = DistributedSite(tmp_path, length=8, mechanism=mechanism)
    config, _ = _config(mechanism)
    rnd = Round(config, site.node, site.ask, seed=2)
    rnd.step()  # advertise
    rnd.step()  # share keys
    rnd.requests.pop(4)  # the server drops site 4 at the masked input: 3 survivors, t = 3
    rnd.step()
    assert site.trained == 1 and len(site.ledger().entries) == 1  # its noised input left
    (unmask,) = [r for c, r in rnd.requests.items() if c == site.node]
    assert isinstance(unmask, UnmaskRequest)
    with pytest.raises(Refused, match="distributed-DP floor of 4"):
        site.ask(unmask)  # the site under attack reveals nothing
    for peer in (2, 3):  # and so do the honest in-memory peers (the rule is the protocol's)
        with pytest.raises(RemoteProtocolError, match="distributed-DP floor"):
            rnd.peers[peer].receive(rnd.requests[peer])
    with pytest.raises(TooFewSurvivors):
        rnd.server.finish(no_answer=rnd.server.pending)


def test_a_replayed_round_is_refused_and_charges_nothing_more(tmp_path):
    mechanism = _mechanism()
    site = DistributedSite(tmp_path, length=8, mechanism=mechanism)
    config, _ = _config(mechanism)
    _through_masked_input(site, config)
    site.restart()  # a new run: Flower's state is gone, the journal is not
    rnd = Round(config, site.node, site.ask, seed=3)
    rnd.step()  # the advert of a round id the site served
    assert rnd.refusals and "round id" in rnd.refusals[0]
    with pytest.raises(RemoteProtocolError, match="min_survivors 4 is above the 3"):
        rnd.step()  # the peers see 3 advertisers: the noise floor cannot be met, they stop too
    assert len(site.ledger().entries) == 1 and site.trained == 1


def test_the_decoded_sum_is_the_sites_noised_contribution(tmp_path):
    """The server's decode of a lone site's vector returns its clipped update plus noise."""
    mechanism = _mechanism()
    config, plan = _config(mechanism)
    encoding = session_encoding(config, dim=DIM)
    sid = b"s" * 32
    half = SiteHalf.prepare(mechanism, config, dim=DIM, store=_store(tmp_path), session_id=sid)
    assert half.event == site_event(config, encoding, colluders=-1)
    update = np.full(DIM, 0.25)
    vector = half.release(update)
    assert vector.dtype == ring_dtype(config.bits) and vector.shape == (8,)
    decoded = decode_sum(vector, encoding=encoding, rotation_seed=rotation_seed(sid))
    noise_std = plan.site_noise / plan.gamma
    assert np.max(np.abs(decoded - update)) < 8 * noise_std + 2 / plan.gamma


def _store(root):
    from fedcore.federation.site.store import SiteStore

    return SiteStore(root, 0)


def test_a_charge_past_the_budget_is_refused_before_training(tmp_path):
    mechanism = _mechanism()
    config, _ = _config(mechanism)
    store = _store(tmp_path)
    for i in range(2):  # the planned two rounds fit
        SiteHalf.prepare(
            mechanism, config, dim=DIM, store=store, session_id=bytes([i]) * 32
        ).release(np.zeros(DIM))
    with pytest.raises(BudgetExceededError):
        SiteHalf.prepare(mechanism, config, dim=DIM, store=store, session_id=b"x" * 32)
