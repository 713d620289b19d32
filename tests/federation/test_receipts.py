"""The federation's receipts (issue 20): a site whose ledger is behind what the federation saw it
spend is refused, through the real ClientApp path; and the rules one by one, each attacked."""

from __future__ import annotations

import json
import shutil
import stat

import pytest

from fedcore.config import resolve
from fedcore.errors import LedgerLostError
from fedcore.federation import messages as m
from fedcore.federation.server.receipts import FILE, Receipts, Spend
from fedcore.federation.server.serve import run_server
from fedcore.federation.site.store import SiteStore
from fedcore.runrecord import read_rows
from tests.federation.conftest import FakeGrid, honest

RECORD_DP = ["dp.site.epsilon=50", "dp.site.noise_multiplier=1.0"]
VICTIM = 0  # the site whose files are put back (node 11 plays partition 0)


def _site_files(store: SiteStore) -> list:
    return [store.ledger_path, store.ledger_seal_path, *store.release_paths()]


def _restoring_backup(out, *, backup_after: int, restore_before: int, seen: list):
    """Site 0 as fedcore's ClientApp, whose whole state (ledger, its seal, its releases) is
    copied after round ``backup_after`` and put back before round ``restore_before``: what a
    restore from a backup does. ``seen`` collects the epsilon and entry count it reports."""
    store = SiteStore(out / "sites", VICTIM)
    backup = out.parent / "backup"

    def behaviour(msg, context):
        server_round = None
        if msg.metadata.message_type == "train":
            server_round = int(m.instruction(msg)[1]["server-round"])
        if server_round == restore_before:
            for path in store.release_paths():
                path.unlink()
            for path in backup.iterdir():
                shutil.copy2(path, store.root / path.name)
        reply = honest(msg, context)
        if server_round is not None:
            seen.append((m.site_epsilon(reply)[1], m.site_charges(reply)))
        if server_round == backup_after:
            backup.mkdir()
            for path in _site_files(store):
                shutil.copy2(path, backup / path.name)
        return reply

    return behaviour


def _run(out, behaviour=honest, rounds=3):
    settings = resolve(
        overrides=["sites=3", f"rounds={rounds}", "local_epochs=1", *RECORD_DP, f"out={out}"]
    )
    run_server(FakeGrid(settings, {11: behaviour, 12: honest, 13: honest}), settings, out)
    return read_rows(out, operator=True)


def test_a_site_restored_from_a_one_round_old_backup_is_refused(tmp_path):
    out = tmp_path / "run"
    seen: list = []
    rows = _run(out, _restoring_backup(out, backup_after=1, restore_before=3, seen=seen))
    # The attack an epsilon-only check misses: one charge on the round-1 backup lands exactly on
    # round 2's receipt (same epsilon), so only the entry count shows the ledger went back.
    assert seen[2][0] == pytest.approx(seen[1][0])
    assert seen[2][1] == seen[1][1]
    assert [r["sites_replied"] for r in rows] == [3, 3, 2]
    (why,) = [v for v in rows[2]["failures"].values() if "behind" in v]
    assert f"site {VICTIM}'s record-level ledger is behind" in why and "backup" in why
    doc = json.loads((out / FILE).read_text())
    assert set(doc["behind"]) == {str(VICTIM)}
    assert stat.S_IMODE((out / FILE).stat().st_mode) == 0o600  # it says who took part


def test_a_refused_site_stays_refused_when_its_fresh_ledger_catches_up(tmp_path):
    out = tmp_path / "run"
    seen: list = []
    rows = _run(out, _restoring_backup(out, backup_after=1, restore_before=3, seen=seen), rounds=5)
    # By round 5 the restored ledger holds as many entries as the receipt of round 2 and more.
    assert seen[4][1] > seen[1][1]
    assert [r["sites_replied"] for r in rows] == [3, 3, 2, 2, 2]


def test_control_an_intact_site_is_never_refused(tmp_path):
    out = tmp_path / "run"
    seen: list = []
    rows = _run(out, _restoring_backup(out, backup_after=99, restore_before=99, seen=seen))
    assert [r["sites_replied"] for r in rows] == [3, 3, 3]
    assert [c for _, c in seen] == [1, 2, 3]  # one ledger entry per round answered
    assert json.loads((out / FILE).read_text())["behind"] == {}


def _spend(epsilon, charges, *, answered="run:1", declined=False, site=4):
    return Spend(site=site, epsilon=epsilon, charges=charges, declined=declined, answered=answered)


def test_the_rules_each_refuse_what_they_should(tmp_path):
    receipts = Receipts.open(tmp_path, delta=1e-5)
    assert receipts.note([_spend(1.0, 3, answered="r:5")]) == {}
    # A re-sent answer (same run and round) and a decline may hold as many entries.
    assert receipts.refusal(_spend(1.0, 3, answered="r:5")) is None
    assert receipts.refusal(_spend(1.0, 3, answered="r:6", declined=True)) is None
    # A new answer must hold one more; fewer entries, or a smaller epsilon, is behind.
    assert "behind" in receipts.refusal(_spend(1.0, 3, answered="r:6"))
    assert "behind" in receipts.refusal(_spend(1.0, 2, answered="r:5"))
    assert "behind" in receipts.refusal(_spend(0.5, 9, answered="r:6"))
    assert receipts.refusal(_spend(1.2, 4, answered="r:6")) is None
    # A site that reports no entry count (an older version) is held to the epsilon rule.
    assert receipts.refusal(_spend(1.0, None, answered="r:6")) is None
    assert receipts.refusal(_spend(0.9, None, answered="r:6")) is not None
    # Another site, another delta: no receipt to compare with.
    assert receipts.refusal(_spend(0.1, 1, site=5)) is None
    assert Receipts.open(tmp_path, delta=1e-6).refusal(_spend(0.1, 1)) is None


def test_receipts_outlive_the_object_and_a_damaged_file_is_refused(tmp_path):
    receipts = Receipts.open(tmp_path, delta=1e-5)
    receipts.note([_spend(2.0, 5)])
    assert receipts.note([_spend(1.0, 1, answered="run:2")])  # refused, now behind
    again = Receipts.open(tmp_path, delta=1e-5)
    assert again.last[4]["charges"] == 5 and 4 in again.behind
    assert again.refusal(_spend(9.0, 99, answered="run:7")) is not None  # stays refused
    (tmp_path / FILE).write_text("{not json")
    with pytest.raises(LedgerLostError, match="receipts"):
        Receipts.open(tmp_path, delta=1e-5)


def test_receipts_kept_in_the_state_dir_across_runs(tmp_path):
    """With dp.server.state_dir the receipts outlive the run record: a second run whose site 0
    lost its ledger (deleted with its seal and releases) refuses it at its first answer."""
    state = tmp_path / "state"
    first, second = tmp_path / "a", tmp_path / "b"
    common = ["sites=3", "rounds=1", "local_epochs=1", *RECORD_DP, f"dp.server.state_dir={state}"]
    for out in (first, second):
        if out == second:  # the sites keep their state across runs: carry it, minus site 0's
            shutil.copytree(first / "sites", second / "sites")
            for path in _site_files(SiteStore(second / "sites", VICTIM)):
                path.unlink()
        settings = resolve(overrides=[*common, f"out={out}"])
        run_server(FakeGrid(settings, {11: honest, 12: honest, 13: honest}), settings, out)
    assert (state / FILE).exists() and not (second / FILE).exists()
    (row,) = read_rows(second, operator=True)
    assert row["sites_replied"] == 2
    assert any("behind" in v for v in row["failures"].values())
