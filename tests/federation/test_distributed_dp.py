"""Distributed DP wired end to end (issue 22): the sites add discrete noise before masking, the
server decodes the noised sum, every site charges its own ledger against the server, and the run
record names the mechanism, its parameters and the epsilon per round."""

import json

import pytest

from fedcore.config import resolve
from fedcore.errors import ConfigError
from fedcore.federation.server.serve import run_server
from fedcore.federation.site.store import SiteStore
from fedcore.privacy import PrivacyLedger
from fedcore.protections import protections_of
from tests.federation.conftest import FakeGrid, honest

NODES = (11, 12, 13, 14)
BASE = [
    "sites=4",
    "rounds=2",
    "local_epochs=1",
    "secagg.timeout=5",
    "secagg.enabled=true",
    "dp.distributed.epsilon=4",
]


def _run(tmp_path, overrides=(), behaviours=None):
    out = tmp_path / "run"
    settings = resolve(overrides=[*BASE, *overrides, f"out={out}"])
    grid = FakeGrid(settings, behaviours or {node: honest for node in NODES})
    run_server(grid, settings, out)
    return settings, out


def _rows(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_a_distributed_run_completes_and_records_its_epsilon_per_round(tmp_path):
    settings, out = _run(tmp_path)
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["server_mechanism"] == "distributed"
    assert privacy["noise"].startswith("distributed discrete Gaussian: each site adds")
    assert privacy["server_neighbouring_relation"].startswith("zero-out")
    rounds = privacy["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    eps = [r["server_epsilon"] for r in rounds]
    assert 0 < eps[0] < eps[1] <= 4.0
    charges = privacy["federation"]["entries"]
    assert [c["round"] for c in charges] == [1, 2]
    assert all("20-bit ring" in c["label"] and "4 survivors" in c["label"] for c in charges)
    event = charges[0]["event"]
    assert event["kind"] == "distributed_discrete_gaussian" and event["noisers"] == 2
    plan = protections_of(settings).distributed.plan(sites=4, dim=_dim(out))
    assert event["sigma"] == plan.site_noise and event["dim"] == plan.padded_dim
    assert eps[-1] == pytest.approx(plan.epsilon, rel=1e-3)  # the planned two rounds, spent
    # every site charged its own ledger, once per round, with the event the session implied
    for site in range(4):
        path = SiteStore(out / "sites", site).distributed_ledger_path
        ledger = PrivacyLedger.load(path)
        assert len(ledger.entries) == 2
        assert ledger.scope.kind.value == "site_against_server"
        assert ledger.entries[0].event == plan.round_event()  # what the server planned
        assert ledger.epsilon() == pytest.approx(eps[-1], rel=1e-9)
    summary = (out / "summary.md").read_text()
    assert "distributed DP, discrete Gaussian noise added by each site" in summary
    assert "against the server itself" in summary
    rows = _rows(out)
    assert rows[-1]["distributed_bits"] == 20 and rows[-1]["distributed_gamma"] == plan.gamma


def _dim(out):
    import torch

    return sum(int(v.numel()) for v in torch.load(out / "model.pt").values())


def test_a_round_below_the_survivor_floor_reveals_no_sum(tmp_path):
    """4 sites at tolerance 0.1: the floor is 4; one site fails after the share stage, the others
    refuse to unmask, the round releases nothing and the federation ledger charges nothing."""
    from tests.federation.test_secagg_rounds import failing_at

    behaviours = {node: honest for node in NODES}
    behaviours[NODES[-1]] = failing_at("masked_input")
    settings, out = _run(tmp_path, ["rounds=1", "max_failed_rounds=2"], behaviours)
    operator = [json.loads(line) for line in (out / "operator.jsonl").read_text().splitlines()]
    failures = [r for r in operator if "failures" in r][0]["failures"]
    assert "nothing revealed" in failures["round"] or "no aggregate" in failures["round"]
    assert privacy_rounds_released(out) == [None]
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["federation"]["entries"] == []  # nothing released, nothing charged
    for site in range(3):  # the survivors charged what they sent, the dropped site nothing
        path = SiteStore(out / "sites", site).distributed_ledger_path
        assert len(PrivacyLedger.load(path).entries) == 1


def privacy_rounds_released(out):
    return [r.get("distributed_gamma") for r in _rows(out)]


def test_distributed_dp_needs_secure_aggregation_and_excludes_the_server_gaussian():
    with pytest.raises(ConfigError, match="'secagg.enabled' is false"):
        protections_of(resolve(overrides=["dp.distributed.epsilon=4"]))
    with pytest.raises(ConfigError, match="both set"):
        protections_of(resolve(overrides=[*BASE, "dp.server.epsilon=4"]))
    ring = protections_of(resolve(overrides=[*BASE, "dp.distributed.bits=24"])).secagg
    assert ring is not None and ring.bits == 24  # the session's ring is distributed DP's
