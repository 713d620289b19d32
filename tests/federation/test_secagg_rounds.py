"""Secure aggregation inside the federation: same model as plain FedAvg up to the encoding error,
dropouts at every stage, refused strategies, and what a site keeps between stages."""

import json
import stat

import pytest
import torch
from flwr.app import Error, Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, Krum

from fedcore.config import resolve
from fedcore.errors import ConfigError
from fedcore.federation.server.secagg_round import check_linear
from fedcore.federation.server.serve import run_server
from fedcore.federation.site import secagg as secagg_site
from fedcore.protections import protections_of
from fedcore.runrecord import read_rows
from fedcore.secagg import EncodingConfig
from tests.federation.batched_sites import site_grid
from tests.federation.conftest import FakeGrid, honest

NODES = (101, 102, 103, 104)


def _stage(msg):
    record = msg.content.config_records.get(secagg_site.SECAGG)
    return None if record is None else record.get("stage")


def failing_at(stage, *, silent=False):
    """A site that fails (error reply, or silence) when asked for ``stage``."""

    def behave(msg, context):
        if _stage(msg) == stage:
            return (
                None
                if silent
                else Message(Error(code=1, reason=f"site down at {stage}"), reply_to=msg)
            )
        return honest(msg, context)

    return behave


def _run(tmp_path, name, overrides, behaviours=None, *, per_node=1, monkeypatch=None):
    """One node per site, or (``per_node > 1``) the batched engine, whose sites' node ids are
    ``grid.site_ids`` (the behaviours taken in order)."""
    out = tmp_path / name
    settings = resolve(overrides=[*overrides, f"out={out}"])
    behaviours = behaviours or {node: honest for node in NODES}
    if per_node == 1:
        grid = FakeGrid(settings, behaviours)
        grid.site_ids = tuple(behaviours)
    else:
        grid = site_grid(settings, behaviours, per_node=per_node, monkeypatch=monkeypatch)
    run_server(grid, settings, out)
    rows = read_rows(out, operator=True)  # with DP, the diagnostics are in operator.jsonl
    return settings, grid, rows, torch.load(out / "model.pt")


BASE = ["sites=4", "local_epochs=1", "secagg.timeout=5"]


# One node per site, and the batched engine (issue 24): two nodes each playing two sites.
PER_NODE = pytest.mark.parametrize("per_node", [1, 2], ids=["own-node", "batched"])


@PER_NODE
@pytest.mark.parametrize("rounds", [1, 2])
def test_same_model_as_plain_fedavg_up_to_the_encoding_error(
    tmp_path, rounds, per_node, monkeypatch
):
    _, _, plain_rows, plain = _run(tmp_path, "plain", [*BASE, f"rounds={rounds}"])
    settings, grid, rows, masked = _run(
        tmp_path,
        "secagg",
        [*BASE, f"rounds={rounds}", "secagg.enabled=true"],
        per_node=per_node,
        monkeypatch=monkeypatch,
    )
    assert [r["sites_replied"] for r in rows] == [4] * rounds
    assert rows[0]["secagg"]["survivors"] == list(grid.site_ids)
    for row in rows:  # per round, not cumulative; every stage timed
        assert row["secagg"]["bytes_up_by_site"] == rows[0]["secagg"]["bytes_up_by_site"]
        assert set(row["secagg"]["stage_seconds"]) == {
            "advertise",
            "share",
            "masked_input",
            "unmask",
        }
    assert rows[0]["num_examples"] == plain_rows[0]["num_examples"]  # the exact total weight
    # Per coordinate, the decoded mean's rounding error has std <= sqrt(n) / (2 s W)
    # (fedcore.secagg.encoding); 8 standard deviations bound the max over ~9k coordinates, and
    # the second round adds what training amplifies of the first round's difference.
    encoding = EncodingConfig(bits=32, clip=settings.secagg.clip_range, max_total_weight=1 << 24)
    bound = (
        8
        * encoding.error_bound(sites=4, total_weight=rows[0]["num_examples"])
        * (1 if rounds == 1 else 50)
    )
    diff = max(float((masked[k] - plain[k]).abs().max()) for k in plain)
    assert diff <= bound, (diff, bound)
    assert diff > 0  # the sum really went through the ring, with stochastic rounding


FIVE = (101, 102, 103, 104, 105)


@pytest.mark.parametrize(
    ("bad_stages", "lost"),
    [
        # One site failing at key setup and another during training (issue 5): with 5 sites the
        # default threshold is 3, so the 3 others finish the round.
        ({102: failing_at("advertise"), 103: failing_at("masked_input")}, {102, 103}),
        ({102: failing_at("share", silent=True)}, {102}),
        ({103: failing_at("masked_input", silent=True)}, {103}),
        # A site that vanishes at the unmask stage already contributed its masked input: it stays in
        # the sum, and the others' shares unmask it.
        ({103: failing_at("unmask")}, set()),
    ],
)
@PER_NODE
def test_sites_failing_at_any_stage_are_dropped_and_the_round_completes(
    tmp_path, bad_stages, lost, per_node, monkeypatch
):
    behaviours = {node: bad_stages.get(node, honest) for node in FIVE}
    out = tmp_path / "run"
    settings = resolve(
        overrides=[
            "sites=5",
            "rounds=2",
            "local_epochs=1",
            "secagg.timeout=5",
            "secagg.enabled=true",
            f"out={out}",
        ]
    )
    grid = site_grid(settings, behaviours, per_node=per_node, monkeypatch=monkeypatch)
    ids = dict(zip(FIVE, grid.site_ids, strict=True))  # as the server names the sites
    run_server(grid, settings, out)
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["secagg"]["threshold"] == 3
        assert set(row["secagg"]["survivors"]) == {ids[n] for n in set(FIVE) - lost}
        assert row["sites_replied"] == 5 - len(lost)
        for node in bad_stages:
            assert str(ids[node]) in row["failures"]
    model = torch.load(out / "model.pt")
    assert all(torch.isfinite(v).all() for v in model.values())
    assert rows[-1]["eval_accuracy"] > rows[0]["eval_accuracy"] * 0.5


@PER_NODE
def test_too_few_survivors_abort_cleanly_and_keep_the_model(tmp_path, per_node, monkeypatch):
    behaviours = {
        101: honest,
        102: failing_at("advertise"),
        103: failing_at("advertise"),
        104: honest,
    }
    _, _, rows, _ = _run(
        tmp_path,
        "run",
        [*BASE, "rounds=1", "secagg.enabled=true"],
        behaviours,
        per_node=per_node,
        monkeypatch=monkeypatch,
    )
    assert rows[0]["sites_replied"] == 0 and rows[0]["secagg"]["survivors"] == []
    assert "nothing revealed" in rows[0]["failures"]["round"]


def test_only_linear_strategies_are_accepted():
    check_linear(FedAvg())
    check_linear(FedAdam())
    for strategy in (FedMedian(), Krum()):
        with pytest.raises(ConfigError, match="individual update"):
            check_linear(strategy)
    with pytest.raises(ConfigError, match="individual update"):
        protections_of(resolve(overrides=["secagg.enabled=true", "strategy=fedmedian"]))


def test_site_keeps_only_public_data_between_stages(tmp_path):
    settings, grid, _, _ = _run(tmp_path, "run", [*BASE, "rounds=1", "secagg.enabled=true"])
    for context in grid.contexts.values():
        record = context.state.config_records[secagg_site.SECAGG]
        assert set(record.keys()) <= {"round-id", "payloads", "session-id"}
    keys = sorted((tmp_path / "run" / "sites").glob("site-*.secagg.key"))
    journals = sorted((tmp_path / "run" / "sites").glob("site-*.secagg.journal"))
    assert len(keys) == len(journals) == 4
    for path in [*keys, *journals]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for path in journals:  # the round is in each site's journal, done once
        events = [json.loads(line) for line in path.read_text().splitlines()[1:]]
        assert len({e["round"] for e in events}) == 1
        kinds = [k for e in events for k in e if k not in ("round", "at", "run")]
        assert kinds[:4] == ["nonce", "session", "trained", "masked"]
        assert events[-1]["unmasked"] is True
    for path in keys:
        key = path.read_bytes()
        for context in grid.contexts.values():  # the key is nowhere in Flower's state
            blob = b"".join(p for p in context.state.config_records[secagg_site.SECAGG]["payloads"])
            assert key not in blob


def test_record_level_dp_sites_decline_before_the_protocol_starts(tmp_path):
    overrides = [
        *BASE,
        "rounds=4",
        "secagg.enabled=true",
        "dp.site.epsilon=2.4",
        "dp.site.noise_multiplier=1.0",
    ]
    _, _, rows, _ = _run(tmp_path, "run", overrides)
    assert rows[0]["sites_declined"] == 0 and rows[0]["sites_replied"] == 4
    assert set(rows[0]["site_epsilon"]) == {"0", "1", "2", "3"}
    # Once the budgets are spent every site declines at the advertise stage: nobody joins the
    # protocol, nothing is charged, and the run stops.
    assert rows[-1]["sites_declined"] == 4 and rows[-1]["sites_replied"] == 0 and len(rows) < 4
    assert rows[-1]["secagg"]["survivors"] == []
    assert all(0 < eps <= 2.4 for row in rows for eps in row["site_epsilon"].values())
    assert rows[-1]["site_epsilon"] == rows[-2]["site_epsilon"]
