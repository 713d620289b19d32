"""Many sites per simulated node (issue 13): the batched engine against one node per site.

Both engines run the real ServerApp code (``run_server``) over an in-memory Grid whose nodes run
the real ClientApp; the batched engine has fewer nodes than sites, as ``fedcore simulate`` starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time

import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

import clients.app as client_app
from fedcore.config import resolve
from fedcore.crypto import CryptoRng
from fedcore.federation.server.serve import run_server
from fedcore.federation.simulation import batched
from fedcore.federation.site.folders import SIMULATION_MARKER
from tests.federation.conftest import FakeGrid, honest

BASE = [
    "dataset=synthetic",
    "synthetic.samples=600",
    "sites=7",
    "rounds=2",
    "local_epochs=1",
    "round_timeout=5",
    "seed=3",
]


def _history(path):
    return [json.loads(line) for line in (path / "history.jsonl").read_text().splitlines()]


def _run(tmp_path, monkeypatch, settings, *, nodes, name, behaviour=honest):
    """Run the federation on ``nodes`` Flower nodes (``nodes == sites``: one node per site)."""
    if nodes == settings.sites:
        monkeypatch.delenv(batched.NODES_ENV, raising=False)
    else:
        monkeypatch.setenv(batched.NODES_ENV, str(nodes))
    grid = FakeGrid(settings, {5000 + 17 * i: behaviour for i in range(nodes)})
    random.seed(0)  # Flower's fraction_train sampler draws from Python's random module
    run_server(grid, settings, tmp_path / name)
    return torch.load(tmp_path / name / "model.pt"), _history(tmp_path / name), grid


def _assert_same_model(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", [[], ["fraction_train=0.5"], ["strategy=fedadam"]])
def test_batched_and_one_site_per_node_give_the_same_model(tmp_path, monkeypatch, extra):
    settings = resolve(overrides=[*BASE, *extra])
    one, one_rows, one_grid = _run(tmp_path, monkeypatch, settings, nodes=7, name="one")
    many, many_rows, many_grid = _run(tmp_path, monkeypatch, settings, nodes=3, name="many")
    _assert_same_model(one, many)
    for a, b in zip(one_rows, many_rows, strict=True):
        assert (a["sites_sampled"], a["sites_replied"]) == (b["sites_sampled"], b["sites_replied"])
        assert a["eval_accuracy"] == pytest.approx(b["eval_accuracy"])
        assert a["site_eval_loss"] == pytest.approx(b["site_eval_loss"])
    # the batched engine sent one message per node per exchange, not one per site
    assert one_grid.exchanges == many_grid.exchanges


def _seeded_dp_sgd(monkeypatch):
    """DP-SGD noise from a generator seeded by the site's data and the round (tests only: in
    production the noise comes from an unseeded CSPRNG), so both engines draw the same noise."""
    import fedcore.privacy.dpsgd as dpsgd

    original = dpsgd.train_dp_sgd

    def seeded(model, x, y, *, rng, round_number, **kwargs):
        seed = hashlib.sha256(x.tobytes() + bytes([round_number])).digest()
        rng = CryptoRng.from_seed(seed, purpose="test")
        return original(model, x, y, rng=rng, round_number=round_number, **kwargs)

    monkeypatch.setattr(dpsgd, "train_dp_sgd", seeded)


def test_batched_equals_one_site_per_node_under_record_level_dp(tmp_path, monkeypatch):
    _seeded_dp_sgd(monkeypatch)

    def settings(name):
        return resolve(overrides=[*BASE, "dp.site.epsilon=8", f"out={tmp_path / name}"])

    one, one_rows, _ = _run(tmp_path, monkeypatch, settings("one"), nodes=7, name="one")
    many, many_rows, _ = _run(tmp_path, monkeypatch, settings("many"), nodes=3, name="many")
    _assert_same_model(one, many)
    # every site charged its own ledger, the same in both engines
    assert [r["site_epsilon"] for r in one_rows] == [r["site_epsilon"] for r in many_rows]
    assert len(many_rows[-1]["site_epsilon"]) == 7
    ledgers = sorted(p.name for p in (tmp_path / "many" / "sites").rglob("*.ledger.json"))
    assert len(ledgers) == 7


def test_a_failing_site_fails_alone_and_a_silent_node_fails_its_sites(tmp_path, monkeypatch):
    settings = resolve(overrides=BASE)
    real_train_site = client_app.train_site

    def site_two_breaks(msg, context):
        if context.node_config["partition-id"] == 2:
            return Message(Error(code=700, reason="ConfigError: broken data"), reply_to=msg)
        return real_train_site(msg, context)

    monkeypatch.setattr(client_app, "train_site", site_two_breaks)
    _, rows, _ = _run(tmp_path, monkeypatch, settings, nodes=3, name="one-bad")
    for row in rows:
        assert (row["sites_sampled"], row["sites_replied"], row["sites_failed"]) == (7, 6, 1)
        assert list(row["failures"]) == [str(batched.virtual_id(2))]
        assert "broken data" in row["failures"]["3"]

    monkeypatch.setattr(client_app, "train_site", real_train_site)

    def silent_node(msg, context):  # the node playing sites 1 and 4 never answers
        return None if context.node_id == 5017 else honest(msg, context)

    _, rows, _ = _run(
        tmp_path, monkeypatch, settings, nodes=3, name="silent", behaviour=silent_node
    )
    for row in rows:
        assert row["sites_replied"] == 5
        train = {k: v for k, v in row["failures"].items() if "evaluate" not in k}
        assert sorted(train) == ["2", "5"] and all("no reply" in v for v in train.values())


def test_secure_aggregation_runs_batched_too(monkeypatch):
    """``simulation.sites_per_node`` holds under secure aggregation (issue 24): each site a node
    plays stays a party of its own (tests/federation/test_secagg_batched.py)."""
    settings = resolve(overrides=["sites=12", "secagg.enabled=true", "simulation.sites_per_node=4"])
    assert batched.sites_per_node(settings, cpus=2) == 4
    assert batched.node_count(settings, cpus=2) == 3
    monkeypatch.setenv(batched.NODES_ENV, "3")
    assert isinstance(batched.grid_for(object(), settings), batched.BatchedGrid)


def test_node_count_follows_the_setting():
    auto = resolve(overrides=["sites=1000", "client_cpus=1"])
    assert batched.sites_per_node(auto, cpus=2) == 500 and batched.node_count(auto, cpus=2) == 2
    one = resolve(overrides=["sites=1000", "simulation.sites_per_node=1"])
    assert batched.node_count(one, cpus=2) == 1000
    seven = resolve(overrides=["sites=100", "simulation.sites_per_node=7"])
    assert batched.node_count(seven, cpus=16) == 15
    many = resolve(overrides=["sites=10000", "client_cpus=1"])
    assert batched.sites_per_node(many, cpus=2) == batched.MAX_AUTO_SITES_PER_NODE
    assert batched.node_count(many, cpus=2) == 10


def _batch_request(settings, sites):
    content = RecordDict(
        {batched.BATCH: ConfigRecord({batched.SITES: sites, **{f"s{s}": [] for s in sites}})}
    )
    return Message(content=content, dst_node_id=9, message_type="evaluate")


def test_a_deployed_site_refuses_to_play_other_sites(monkeypatch):
    """A server that sends a deployed SuperNode a batched request (to make it train on, or
    reveal, partitions it does not own) gets an error reply, from the real ClientApp."""
    settings = resolve(overrides=BASE)
    monkeypatch.delenv(SIMULATION_MARKER)
    context = Context(
        run_id=1,
        node_id=9,
        node_config={"partition-id": 0, "num-partitions": 7},
        state=RecordDict(),
        run_config=settings.to_run_config(),
    )
    reply = client_app.app(_batch_request(settings, [0, 1]), context)
    assert reply.has_error() and "deployed site" in reply.error.reason


def test_a_batch_naming_unknown_or_repeated_sites_is_refused():
    settings = resolve(overrides=BASE)
    context = Context(
        run_id=1,
        node_id=9,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config=settings.to_run_config(),
    )
    for sites in ([0, 7], [1, 1], [-1]):
        reply = client_app.app(_batch_request(settings, sites), context)
        assert reply.has_error() and "batched request names sites" in reply.error.reason


def test_a_node_holds_only_the_site_it_is_training(tmp_path, monkeypatch):
    """A site's data is loaded when it trains and released after: a node playing many sites
    never holds more than one site's data, and none between rounds."""
    from fedcore.data import federation

    federation.clear_cache()
    settings = resolve(overrides=BASE)
    held: list[int] = []
    real_train_site, real_evaluate_site = client_app.train_site, client_app.evaluate_site

    def counting(real):
        def handler(msg, context):
            reply = real(msg, context)
            held.append(federation._site.cache_info().currsize)
            return reply

        return handler

    monkeypatch.setattr(client_app, "train_site", counting(real_train_site))
    monkeypatch.setattr(client_app, "evaluate_site", counting(real_evaluate_site))
    _run(tmp_path, monkeypatch, settings, nodes=3, name="memory")
    assert len(held) == 2 * 2 * 7  # two rounds of train and evaluate, seven sites
    assert max(held) == 1
    assert federation._site.cache_info().currsize == 0


def test_batched_equals_one_site_per_node_under_dp_fedavg(tmp_path, monkeypatch):
    """Poisson sampling and the server's noise come from the federation's generator, seeded here
    (tests only): both engines sample the same sites and release the same model."""
    import fedcore.federation.server.dp_round as dp_server

    real_create = dp_server.DPFedAvgRound.create.__func__

    def seeded_create(cls, settings, ledger, rng=None):
        return real_create(cls, settings, ledger, CryptoRng.from_seed(11, purpose="test"))

    monkeypatch.setattr(dp_server.DPFedAvgRound, "create", classmethod(seeded_create))
    settings = resolve(overrides=[*BASE, "sites=12", "dp.server.epsilon=50", "fraction_train=0.5"])
    one, one_rows, _ = _run(tmp_path, monkeypatch, settings, nodes=12, name="one")
    many, many_rows, _ = _run(tmp_path, monkeypatch, settings, nodes=5, name="many")
    _assert_same_model(one, many)
    assert [r["server_epsilon"] for r in one_rows] == [r["server_epsilon"] for r in many_rows]

    def sampled(name):  # who took part is in the operator's file, not the published history
        lines = (tmp_path / name / "operator.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines if '"sites_sampled"' in line]
        return [(r["sites_sampled"], r["sites_failed"]) for r in rows]

    assert sampled("one") == sampled("many")
    assert 0 < sum(n for n, _ in sampled("many")) < 24  # Poisson at rate 0.5, not everyone
    assert all(failed == 0 for _, failed in sampled("many"))


def test_simulate_starts_one_flower_node_per_sites_per_node(tmp_path, monkeypatch):
    """``fedcore simulate`` asks Flower for ceil(sites / sites_per_node) nodes and tells the
    ServerApp (same process) how many, for the run only."""
    from fedcore.federation.simulation import engine as simulation

    seen = {}

    def fake_run_app(app_dir, *, sites, run_config, **kwargs):
        seen["nodes"], seen["env"] = sites, os.environ.get(batched.NODES_ENV)

    monkeypatch.delenv(batched.NODES_ENV, raising=False)
    monkeypatch.setattr(simulation, "run_app", fake_run_app)
    for per_node, nodes in ((5, 3), (1, 11)):
        settings = resolve(overrides=["sites=11", f"simulation.sites_per_node={per_node}"])
        simulation.simulate(settings, out_dir=tmp_path, app_dir=tmp_path)
        assert seen == {"nodes": nodes, "env": str(nodes)}
        assert batched.NODES_ENV not in os.environ


def test_the_server_runs_torch_on_client_cpus_threads_for_the_run_only(tmp_path, monkeypatch):
    """The ServerApp (this process) uses ``client_cpus`` torch threads while the simulation runs
    (it shares the CPUs with the workers), and the caller's thread count comes back after."""
    from fedcore.federation.simulation import engine as simulation

    seen = []
    monkeypatch.setattr(simulation, "run_app", lambda *a, **k: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for cpus, threads in (("1", 1), ("2", 2), ("0.5", 1)):
            settings = resolve(overrides=["sites=4", f"client_cpus={cpus}"])
            simulation.simulate(settings, out_dir=tmp_path, app_dir=tmp_path)
            assert seen[-1] == threads
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_node_decodes_the_shared_global_model_once(tmp_path, monkeypatch):
    """The sites one node plays share the global model's record: it is decoded once per batch,
    yet every site gets tensors of its own (a site that changed them would not touch the next)."""
    from flwr.app import ArrayRecord

    settings = resolve(overrides=BASE)
    decoded: list[int] = []
    seen: list[dict] = []
    real_decode = ArrayRecord.to_torch_state_dict

    def counting_decode(self, *args, **kwargs):
        decoded.append(id(self))
        return real_decode(self, *args, **kwargs)

    real_evaluate_round = client_app.evaluate_round

    def spoiling_evaluate_round(settings, *, global_state, **kwargs):
        result = real_evaluate_round(settings, global_state=global_state, **kwargs)
        seen.append({k: v.clone() for k, v in global_state.items()})
        for tensor in global_state.values():
            tensor.fill_(float("nan"))  # a careless site: must not reach the next site
        return result

    monkeypatch.setattr(ArrayRecord, "to_torch_state_dict", counting_decode)
    monkeypatch.setattr(client_app, "evaluate_round", spoiling_evaluate_round)
    _, rows, grid = _run(tmp_path, monkeypatch, settings, nodes=3, name="decode")
    # without sharing, every site would decode it: 2 rounds x 2 exchanges x 7 sites, more than
    # all the decodes here, the server's own included
    assert len(decoded) < 2 * 2 * 7
    for state in seen:
        assert all(torch.isfinite(t).all() for t in state.values())
    assert all(r["sites_failed"] == 0 for r in rows)


def test_the_prompt_engine_loops_deliver_on_the_event_not_the_poll(monkeypatch):
    """The engine's instruction loop, woken by a push, hands the instruction to the workers; its
    fallback poll is set to an hour here, so only the event can have delivered it."""
    import queue
    import threading

    from fedcore.federation.simulation import delivery

    monkeypatch.setattr(delivery, "FALLBACK", 3600.0)

    class State:
        def __init__(self):
            self.pending, self.stored = {1: []}, []

        def get_message_ins(self, *, node_id, limit):
            out, self.pending[node_id] = (
                self.pending[node_id][:limit],
                self.pending[node_id][limit:],
            )
            return out

        def store_message_res(self, message):
            self.stored.append(message)

    state, instructions, replies, stop = State(), queue.Queue(), queue.Queue(), threading.Event()
    threads = [
        threading.Thread(
            target=delivery.add_messages_to_queue, args=(state, instructions, {1: 0}, stop)
        ),
        threading.Thread(target=delivery.put_message_into_state, args=(state, replies, stop)),
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.2)  # the loop has scanned once and waits
        state.pending[1].append("instruction")
        delivery.PUSHED.set()
        assert instructions.get(timeout=60) == "instruction"
        delivery.REPLIED.clear()
        replies.put("reply")
        assert delivery.REPLIED.wait(timeout=60) and state.stored == ["reply"]
    finally:
        stop.set()
        delivery.PUSHED.set()
        for thread in threads:
            thread.join(timeout=5)


def test_prompt_delivery_puts_flowers_loops_back():
    from flwr.server.superlink.fleet.vce import vce_api

    from fedcore.federation.simulation import delivery

    before = (vce_api.add_messages_to_queue, vce_api.put_message_into_state)
    with delivery.prompt_delivery():
        assert delivery.active()
        assert vce_api.add_messages_to_queue is delivery.add_messages_to_queue
    assert not delivery.active()
    assert (vce_api.add_messages_to_queue, vce_api.put_message_into_state) == before
