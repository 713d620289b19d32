"""The distributed-DP events in fedcore's ledger and accountant (issue 22): a ledger holds them,
its file round-trips them (also in a process that never imported their module), and the epsilon
of a history holding one is the RDP composition, checked against independent sums."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from fedcore.errors import BudgetExceededError
from fedcore.privacy import Budget, GaussianEvent, PrivacyLedger, Scope, ScopeKind, epsilon
from fedcore.privacy.accountant import RDP_ORDERS, epsilon_lower_bound
from fedcore.privacy.distributed import (
    DistributedDiscreteGaussianEvent,
    SkellamEvent,
    distributed_epsilon,
)
from fedcore.privacy.events import PoissonSubsampledGaussian, event_from_json, event_to_json

DELTA = 1e-5
DDG = DistributedDiscreteGaussianEvent(
    l2_sensitivity=600.0, l1_sensitivity=6.0e4, noisers=90, dim=1 << 20, sigma=110.0, count=3
)
SKELLAM = SkellamEvent(
    l2_sensitivity=600.0, l1_sensitivity=6.0e4, noisers=90, dim=1 << 20, mu=12100.0, count=2
)


def _ledger(path=None, *, epsilon_budget=100.0):
    return (
        PrivacyLedger.open(
            path,
            scope=Scope(ScopeKind.FEDERATION_SITES, "distributed"),
            budget=Budget(epsilon=epsilon_budget, delta=DELTA),
            accountant="pld",
        )
        if path is not None
        else PrivacyLedger(
            scope=Scope(ScopeKind.FEDERATION_SITES, "distributed"),
            budget=Budget(epsilon=epsilon_budget, delta=DELTA),
        )
    )


@pytest.mark.parametrize("event", [DDG, SKELLAM])
def test_a_distributed_event_alone_costs_what_its_own_conversion_says(event):
    orders = [a for a in RDP_ORDERS if a > 1 and (not event.integer_orders or a == int(a))]
    expected, _ = rdp_privacy_accountant.compute_epsilon(
        orders, event.rdp_curve(tuple(orders)), DELTA
    )
    assert epsilon([event], delta=DELTA) == pytest.approx(expected, rel=1e-12)
    # The module's own conversion minimises over another grid of orders: close, both valid.
    assert epsilon([event], delta=DELTA) == pytest.approx(
        distributed_epsilon((event,), delta=DELTA), rel=0.02
    )
    # count k equals k events of count 1
    single = dataclasses.replace(event, count=1)
    assert epsilon([single] * event.count, delta=DELTA) == pytest.approx(
        epsilon([event], delta=DELTA), rel=1e-12
    )


def test_composed_with_gaussians_the_rdp_curves_add():
    """An independent sum: the Gaussian's a / (2 z^2) and dp-accounting's own RdpAccountant for
    the subsampled Gaussian, plus the event's curve, converted by dp-accounting."""
    orders = [a for a in RDP_ORDERS if a > 1 and a == int(a)]  # Skellam: integer orders
    acct = rdp_privacy_accountant.RdpAccountant(orders=orders)
    import dp_accounting

    acct.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.3)), 5)
    acct.compose(dp_accounting.GaussianDpEvent(4.0), 2)
    curve = acct._rdp + SKELLAM.rdp_curve(tuple(orders))
    expected, _ = rdp_privacy_accountant.compute_epsilon(orders, curve, DELTA)
    events = [
        SKELLAM,
        PoissonSubsampledGaussian(sampling_rate=0.1, noise_multiplier=1.3, count=5),
        GaussianEvent(noise_multiplier=4.0, count=2),
    ]
    assert epsilon(events, delta=DELTA) == pytest.approx(expected, rel=1e-9)
    # and more than either part alone (a composition that could fail to add)
    assert epsilon(events, delta=DELTA) > epsilon(events[1:], delta=DELTA)
    assert epsilon(events, delta=DELTA) > epsilon(events[:1], delta=DELTA)


def test_the_lower_bound_leaves_them_out_and_stays_below():
    events = [DDG, GaussianEvent(noise_multiplier=2.0, count=3)]
    assert epsilon_lower_bound(events, delta=DELTA) <= epsilon(events, delta=DELTA)


def test_a_ledger_charges_refuses_and_keeps_them_on_disk(tmp_path):
    path = tmp_path / "federation.json"
    ledger = _ledger(path)
    ledger.charge(DDG, round_number=1)
    ledger.charge(SKELLAM, round_number=2)
    spent = ledger.epsilon()
    assert spent == pytest.approx(epsilon([DDG, SKELLAM], delta=DELTA), rel=1e-12)
    tight = _ledger(epsilon_budget=epsilon([DDG], delta=DELTA) * 1.01)
    tight.charge(DDG)
    with pytest.raises(BudgetExceededError):
        tight.charge(DDG)
    assert len(tight.entries) == 1  # a refused charge leaves the ledger unchanged
    # The file, read by a process that never imported fedcore.privacy.distributed:
    code = (
        "import sys, json; from fedcore.privacy import PrivacyLedger; "
        f"l = PrivacyLedger.load({str(path)!r}); "
        "assert 'fedcore.privacy.distributed' in sys.modules; print(json.dumps(l.epsilon()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == pytest.approx(spent, rel=1e-12)


@pytest.mark.parametrize("event", [DDG, SKELLAM])
def test_json_round_trip(event):
    assert event_from_json(json.loads(json.dumps(event_to_json(event)))) == event
    assert np.all(np.isfinite(event.rdp_curve((2.0, 3.0))))
