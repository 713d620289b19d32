"""A ledger that cannot lose a charge (issue 11 point 5): one writer at a time, a seal that catches
a lost or rolled-back ledger, and an operator reset the ledger records."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from fedcore.cli import main as cli
from fedcore.config import resolve
from fedcore.errors import LedgerLostError
from fedcore.federation.site.folders import site_ledger
from fedcore.federation.site.store import SiteStore
from fedcore.privacy import Budget, GaussianEvent, NoPrivacyLoss, PrivacyLedger, Scope, ScopeKind

SITE = Scope(ScopeKind.SITE_RECORDS, "site-0")
BUDGET = Budget(epsilon=50.0, delta=1e-5)
EVENT = GaussianEvent(noise_multiplier=5.0)


def test_two_writers_on_one_file_both_keep_their_charge(tmp_path):
    """Two processes opened the same ledger; each charges once. Without a locked re-read the file
    kept one charge; now both are in it and the second writer's epsilon counts the first's."""
    path = tmp_path / "site-0.ledger.json"
    a = PrivacyLedger.open(path, scope=SITE, budget=BUDGET)
    b = PrivacyLedger.open(path, scope=SITE, budget=BUDGET)
    a.charge(EVENT, round_number=1)
    b.charge(EVENT, round_number=1)
    on_disk = PrivacyLedger.load(path)
    assert len(on_disk.entries) == 2
    assert b.epsilon() == on_disk.epsilon() > a.epsilon()


def test_concurrent_processes_lose_no_charge(tmp_path):
    path = tmp_path / "site-0.ledger.json"
    PrivacyLedger.open(path, scope=SITE, budget=BUDGET)
    child = textwrap.dedent(
        f"""
        from fedcore.privacy import Budget, GaussianEvent, PrivacyLedger, Scope, ScopeKind
        led = PrivacyLedger.open({str(path)!r}, scope=Scope(ScopeKind.SITE_RECORDS, "site-0"),
                                 budget=Budget(epsilon=50.0, delta=1e-5))
        for i in range(8):
            led.charge(GaussianEvent(noise_multiplier=5.0), round_number=i)
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", child]) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert len(PrivacyLedger.load(path).entries) == 16


def _settings(tmp_path):
    return resolve(overrides=["dp.site.epsilon=5", f"out={tmp_path / 'run'}"])


def test_a_site_with_a_key_and_no_ledger_refuses_until_reset(tmp_path):
    """The real site path (site_ledger on the site's state-dir): a key on disk and no ledger is a
    lost ledger, not a new one."""
    settings, state = _settings(tmp_path), tmp_path / "state"
    store = SiteStore(state, 3).ensure()
    store.key_path.write_bytes(b"k" * 32)
    with pytest.raises(LedgerLostError, match="fedcore ledger reset"):
        site_ledger(settings, site_id=3, node_config={"state-dir": str(state)})
    code = cli(
        ["ledger", "reset", "--state-dir", str(state), "--site", "3", "--reason", "new disk"]
    )
    assert code == 0
    ledger = site_ledger(settings, site_id=3, node_config={"state-dir": str(state)})
    assert len(ledger.entries) == 1 and isinstance(ledger.entries[0].event, NoPrivacyLoss)
    assert "operator reset" in ledger.entries[0].label and "new disk" in ledger.entries[0].label


def test_a_deleted_ledger_is_refused(tmp_path):
    settings, state = _settings(tmp_path), tmp_path / "state"
    nc = {"state-dir": str(state)}
    site_ledger(settings, site_id=0, node_config=nc).charge(EVENT, round_number=1)
    SiteStore(state, 0).ledger_path.unlink()
    with pytest.raises(LedgerLostError, match="seal records 1 charges"):
        site_ledger(settings, site_id=0, node_config=nc)


def test_an_older_copy_put_back_is_refused_and_a_reset_is_recorded(tmp_path):
    settings, state = _settings(tmp_path), tmp_path / "state"
    nc = {"state-dir": str(state)}
    path = SiteStore(state, 0).ledger_path
    ledger = site_ledger(settings, site_id=0, node_config=nc)
    ledger.charge(EVENT, round_number=1)
    shutil.copy(path, tmp_path / "backup.json")
    ledger.charge(EVENT, round_number=2)
    shutil.copy(tmp_path / "backup.json", path)  # restored from yesterday's backup
    with pytest.raises(LedgerLostError, match="older than what this scope has released"):
        site_ledger(settings, site_id=0, node_config=nc)
    assert cli(["ledger", "reset", "--state-dir", str(state), "--site", "0"]) == 2  # no reason
    assert cli(["ledger", "reset", "--state-dir", str(state), "--site", "0", "--reason", "x"]) == 0
    reopened = site_ledger(settings, site_id=0, node_config=nc)
    assert [e.round_number for e in reopened.entries] == [1, None]
    assert "seal recorded 2 charges; this ledger holds 1" in reopened.entries[-1].label


def test_a_ledger_newer_than_its_seal_opens(tmp_path):
    """A crash between the ledger's write and its seal's leaves the ledger ahead: not a loss."""
    path = tmp_path / "l.json"
    led = PrivacyLedger.open(path, scope=SITE, budget=BUDGET)
    led.charge(EVENT)
    seal = path.with_name("l.seal")
    doc = json.loads(seal.read_text())
    seal.write_text(json.dumps({**doc, "charges": 0}))
    assert len(PrivacyLedger.open(path, scope=SITE, budget=BUDGET).entries) == 1
    assert json.loads(seal.read_text())["charges"] == 1


@pytest.mark.parametrize("seal", ["[1, 2]", '"text"', "null", '{"format": "x", "charges": 1}'])
def test_a_seal_that_is_not_a_seal_object_is_a_corrupt_ledger_not_a_crash(tmp_path, seal):
    """A seal holding JSON of the wrong shape raised AttributeError from ``doc.get``; it is a
    CorruptLedgerError (an InvalidMessage) and nothing is created or changed."""
    from fedcore.privacy import CorruptLedgerError
    from fedcore.privacy.ledger import seal_path_of

    path = tmp_path / "site-0.ledger.json"
    seal_path_of(path).write_text(seal)
    with pytest.raises(CorruptLedgerError, match="seal"):
        PrivacyLedger.open(path, scope=SITE, budget=BUDGET)
    assert not path.exists() and seal_path_of(path).read_text() == seal
