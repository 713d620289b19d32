"""``fedcore ledger reset``: a reset is for a ledger that refuses to open; a healthy one needs
``--force`` (issue 25 point 6)."""

from __future__ import annotations

import shutil
from pathlib import Path

from fedcore.cli import main as cli
from fedcore.federation.site.store import SiteStore
from fedcore.privacy import Budget, GaussianEvent, NoPrivacyLoss, PrivacyLedger, Scope, ScopeKind

SITE = Scope(ScopeKind.SITE_RECORDS, "site-0")
BUDGET = Budget(epsilon=50.0, delta=1e-5)
EVENT = GaussianEvent(noise_multiplier=5.0)


def _charged(state: Path, charges: int) -> Path:
    path = SiteStore(state, 0).ensure().ledger_path
    ledger = PrivacyLedger.open(path, scope=SITE, budget=BUDGET)
    for i in range(charges):
        ledger.charge(EVENT, round_number=i + 1)
    return path


def _reset(state: Path, *extra: str) -> int:
    return cli(
        ["ledger", "reset", "--state-dir", str(state), "--site", "0", "--reason", "x", *extra]
    )


def test_a_healthy_ledger_is_not_reset_without_force(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    state = tmp_path / "state"
    path = _charged(state, 2)
    before = path.read_bytes()
    assert _reset(state) == 2
    err = capsys.readouterr().err
    assert "opens (2 charges" in err and "--force" in err
    assert path.read_bytes() == before  # nothing written
    assert _reset(state, "--force") == 0
    entries = PrivacyLedger.load(path).entries
    assert len(entries) == 3 and isinstance(entries[-1].event, NoPrivacyLoss)


def test_a_ledger_that_refuses_to_open_is_reset_without_force(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = _charged(state, 1)
    shutil.copy(path, tmp_path / "backup.json")
    PrivacyLedger.open(path, scope=SITE, budget=BUDGET).charge(EVENT, round_number=2)
    shutil.copy(tmp_path / "backup.json", path)  # older than its seal
    assert _reset(state) == 0
    path.unlink()  # missing
    assert _reset(state) == 0
