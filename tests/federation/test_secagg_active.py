"""ACTIVE-mode secure aggregation inside the federation: sites enrol their signing keys in a
registry the server only reads, sign adverts and survivor sets, and refuse a downgraded round."""

import json

import pytest

from fedcore.config import resolve
from fedcore.crypto import CryptoRng
from fedcore.errors import ConfigError
from fedcore.federation.server.serve import run_server
from fedcore.federation.site import registry as secagg_registry
from fedcore.secagg import default_threshold
from fedcore.secagg.config import Mode
from tests.federation.batched_sites import site_grid
from tests.federation.conftest import FakeGrid, honest

FIVE = (101, 102, 103, 104, 105)
ACTIVE = [
    "sites=5",
    "rounds=2",
    "local_epochs=1",
    "secagg.timeout=5",
    "secagg.enabled=true",
    "secagg.mode=active",
]


def _run(tmp_path, overrides, *, before=None, per_node=1, monkeypatch=None):
    out = tmp_path / "run"
    settings = resolve(overrides=[*overrides, f"out={out}"])
    if before is not None:
        before(out / "sites" / secagg_registry.FOLDER)
    if per_node == 1:
        grid = FakeGrid(settings, {node: honest for node in FIVE})
    else:  # the batched engine (issue 24): the sites' node ids are 1..5
        grid = site_grid(
            settings, {node: honest for node in FIVE}, per_node=per_node, monkeypatch=monkeypatch
        )
    run_server(grid, settings, out)
    return out, [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("per_node", [1, 3], ids=["own-node", "batched"])
def test_an_active_round_enrols_signs_and_completes(tmp_path, per_node, monkeypatch):
    out, rows = _run(tmp_path, ACTIVE, per_node=per_node, monkeypatch=monkeypatch)
    ids = FIVE if per_node == 1 else (1, 2, 3, 4, 5)
    assert [r["sites_replied"] for r in rows] == [5, 5]
    assert rows[0]["secagg"]["threshold"] == default_threshold(5, mode=Mode.ACTIVE) == 4
    assert {r["secagg"]["mode"] for r in rows} == {"active"}
    # Enrolment happens once; every later round only reads the registry.
    assert "enrol" in rows[0]["secagg"]["stage_seconds"]
    assert "enrol" not in rows[1]["secagg"]["stage_seconds"]
    assert "consistency" in rows[1]["secagg"]["stage_seconds"]
    registry = secagg_registry.load_registry(out / "sites" / secagg_registry.FOLDER)
    assert sorted(registry) == list(ids)
    for site, key in zip(range(5), [registry[n] for n in ids], strict=True):
        site_key = (out / "sites" / f"site-{site}.secagg.key").read_bytes()
        seed = secagg_registry.signing_seed(site_key)
        from fedcore.crypto.signing import verify_key_of

        assert verify_key_of(seed) == key
    assert rows[1]["eval_accuracy"] > rows[0]["eval_accuracy"] * 0.5


def test_a_forged_registry_entry_costs_only_that_site(tmp_path):
    forged = CryptoRng.from_seed(3).bytes(32)

    def forge(folder):  # someone wrote node 102's entry before it could enrol
        folder.mkdir(parents=True)
        (folder / f"102{secagg_registry.SUFFIX}").write_text(forged.hex())

    out, rows = _run(tmp_path, ACTIVE, before=forge)
    for row in rows:
        assert set(row["secagg"]["survivors"]) == {101, 103, 104, 105}
        assert "102" in row["failures"]
        # Without a certificate from the federation CA the forged entry counts for nobody; the
        # server does not offer node 102 a round, and site 102 would refuse to advertise under it.
        why = row["failures"]["102"]
        assert "no signing key in the registry" in why or "another site's key" in why
    # The entry was not overwritten.
    assert (out / "sites" / secagg_registry.FOLDER / "102.ed25519.pub").read_text() == forged.hex()


def test_publishing_is_write_once(tmp_path):
    key = CryptoRng.from_seed(1).bytes(32)
    public = secagg_registry.publish(tmp_path, 7, key)
    assert secagg_registry.publish(tmp_path, 7, key) == public
    with pytest.raises(ConfigError, match="another site's key"):
        secagg_registry.publish(tmp_path, 7, CryptoRng.from_seed(2).bytes(32))
    assert secagg_registry.load_registry(tmp_path) == {7: public}
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    with pytest.raises(ConfigError, match="cannot publish"):
        secagg_registry.publish(blocked, 8, key)


def test_a_round_whose_sites_cannot_enrol_is_skipped_not_fatal(tmp_path):
    def block(folder):  # the registry folder cannot be created: every enrolment fails
        folder.parent.mkdir(parents=True)
        folder.write_text("not a folder")

    _, rows = _run(tmp_path, ACTIVE, before=block)
    assert len(rows) == 2
    for row in rows:
        assert row["sites_replied"] == 0 and row["secagg"]["survivors"] == []
        assert "got 0 of 5 sampled; nothing released" in row["failures"]["round"]
        assert "cannot publish" in row["failures"]["101"]
