"""The ledger: check before commit, durable JSON, typed errors, restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcore.errors import BudgetExceededError, ConfigError, FedcoreError
from fedcore.privacy.accountant import epsilon
from fedcore.privacy.events import (
    GaussianEvent,
    NonPrivate,
    PoissonSubsampledGaussian,
    SelfComposedEvent,
)
from fedcore.privacy.ledger import Budget, CorruptLedgerError, PrivacyLedger, Scope, ScopeKind

SITE = Scope(ScopeKind.SITE_RECORDS, "site-0")
# A few fixed events keep the accountant's cache warm across hypothesis examples.
EVENTS = [
    PoissonSubsampledGaussian(sampling_rate=0.2, noise_multiplier=3.0, count=5),
    PoissonSubsampledGaussian(sampling_rate=0.05, noise_multiplier=4.0, count=10),
    GaussianEvent(noise_multiplier=4.0),
]


def ledger(eps: float = 2.0, delta: float = 1e-5, path: Path | None = None) -> PrivacyLedger:
    return PrivacyLedger(scope=SITE, budget=Budget(epsilon=eps, delta=delta), path=path)


def snapshot(led: PrivacyLedger) -> tuple:
    return (led.entries, led.epsilon(), json.dumps(led.to_json(), sort_keys=True))


@settings(max_examples=6, deadline=None)
@given(index=st.integers(0, len(EVENTS) - 1), k=st.integers(1, 3))
def test_charging_k_times_equals_charging_once_with_count_k(index, k):
    event = EVENTS[index]
    many, once = ledger(eps=50.0), ledger(eps=50.0)
    for _ in range(k):
        many.charge(event)
    once.charge(SelfComposedEvent(event=event, count=k))
    assert many.epsilon() == once.epsilon()
    probe = PoissonSubsampledGaussian(sampling_rate=0.2, noise_multiplier=3.0, count=5)
    assert many.epsilon_if_charged(probe) == once.epsilon_if_charged(probe)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    plan=st.lists(st.sampled_from([0, 2]), min_size=1, max_size=5),
    budget=st.sampled_from([0.8, 1.5]),
)
def test_a_refused_charge_leaves_the_ledger_and_its_file_unchanged(tmp_path, plan, budget):
    path = tmp_path / f"l-{os.urandom(4).hex()}.json"
    led = PrivacyLedger.open(path, scope=SITE, budget=Budget(epsilon=budget, delta=1e-5))
    for index in plan:
        before, on_disk = snapshot(led), path.read_bytes()
        try:
            led.charge(EVENTS[index])
        except BudgetExceededError:
            assert snapshot(led) == before
            assert path.read_bytes() == on_disk
            assert not led.can_afford(EVENTS[index])
        else:
            assert led.epsilon() <= budget
            assert PrivacyLedger.load(path).epsilon() == led.epsilon()


def test_check_and_can_afford_charge_nothing():
    led = ledger(eps=1.0)
    big = GaussianEvent(noise_multiplier=0.5, count=4)
    assert led.can_afford(EVENTS[0])
    assert led.check(EVENTS[0]) == epsilon(EVENTS[0], delta=1e-5)
    assert not led.can_afford(big)
    with pytest.raises(BudgetExceededError):
        led.check(big)
    with pytest.raises(BudgetExceededError):
        led.charge(NonPrivate())
    assert led.entries == () and led.epsilon() == 0.0


def test_save_and_load_give_the_same_epsilon_and_refusals(tmp_path):
    path = tmp_path / "ledger.json"
    led = PrivacyLedger.open(path, scope=SITE, budget=Budget(epsilon=1.5, delta=1e-5))
    charged = 0
    while led.can_afford(EVENTS[0]):
        led.charge(EVENTS[0], round_number=charged, label="round")
        charged += 1
    assert charged >= 1
    again = PrivacyLedger.load(path)
    assert again.epsilon() == led.epsilon()
    assert again.entries == led.entries
    with pytest.raises(BudgetExceededError):
        again.charge(EVENTS[0])
    # no temp files left: the ledger, its seal and its lock file
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".ledger.lock",
        "ledger.json",
        "ledger.seal",
    ]


def test_open_refuses_a_different_budget(tmp_path):
    path = tmp_path / "l.json"
    PrivacyLedger.open(path, scope=SITE, budget=Budget(epsilon=1.0, delta=1e-5))
    with pytest.raises(ConfigError):
        PrivacyLedger.open(path, scope=SITE, budget=Budget(epsilon=9.0, delta=1e-5))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "edit", "not_object", "bad_event"])
def test_a_corrupt_file_raises_a_typed_error_and_is_left_alone(tmp_path, damage):
    path = tmp_path / "l.json"
    led = PrivacyLedger.open(path, scope=SITE, budget=Budget(epsilon=5.0, delta=1e-5))
    led.charge(EVENTS[2])
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "edit":  # lower the noise without fixing the checksum
        path.write_text(text.replace('"noise_multiplier": 4.0', '"noise_multiplier": 40.0'))
    elif damage == "not_object":
        path.write_text("[1, 2, 3]")
    else:  # a well-formed file whose event is malformed, with a valid checksum
        doc = json.loads(text)
        doc["entries"][0]["event"]["noise_multiplier"] = -1
        from fedcore.privacy.ledger_files import digest as _digest

        doc["sha256"] = _digest({k: v for k, v in doc.items() if k != "sha256"})
        path.write_text(json.dumps(doc))
    before = path.read_bytes()
    with pytest.raises(CorruptLedgerError) as info:
        PrivacyLedger.load(path)
    assert isinstance(info.value, FedcoreError)
    assert not isinstance(info.value, json.JSONDecodeError)
    assert path.read_bytes() == before


def test_a_failed_write_leaves_ledger_and_file_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "l.json"
    led = PrivacyLedger.open(path, scope=SITE, budget=Budget(epsilon=5.0, delta=1e-5))
    led.charge(EVENTS[2])
    before, on_disk = snapshot(led), path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        led.charge(EVENTS[2])
    assert snapshot(led) == before and path.read_bytes() == on_disk
    # no temporary file is left; the seal still matches the (unchanged) ledger
    assert sorted(p.name for p in tmp_path.iterdir()) == [".l.lock", "l.json", "l.seal"]


def test_restart_in_a_separate_process(tmp_path):
    """A child process writes a ledger and exits; the reloaded ledger agrees with it."""
    path = tmp_path / "site.json"
    child = textwrap.dedent(
        f"""
        import json
        from fedcore.privacy import (Budget, PoissonSubsampledGaussian, PrivacyLedger, Scope,
                                     ScopeKind)
        led = PrivacyLedger.open({str(path)!r}, scope=Scope(ScopeKind.SITE_RECORDS, "site-7"),
                                 budget=Budget(epsilon=0.5, delta=1e-5))
        event = PoissonSubsampledGaussian(sampling_rate=0.05, noise_multiplier=4.0, count=10)
        rounds = 0
        while led.can_afford(event):
            led.charge(event, round_number=rounds)
            rounds += 1
        print(json.dumps({{"epsilon": led.epsilon(), "rounds": rounds}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, check=True, timeout=120
    )
    reported = json.loads(out.stdout.strip().splitlines()[-1])
    led = PrivacyLedger.load(path)
    assert reported["rounds"] >= 1 and len(led.entries) == reported["rounds"]
    assert led.epsilon() == reported["epsilon"]
    with pytest.raises(BudgetExceededError):
        led.charge(PoissonSubsampledGaussian(sampling_rate=0.05, noise_multiplier=4.0, count=10))
    assert len(PrivacyLedger.load(path).entries) == reported["rounds"]
