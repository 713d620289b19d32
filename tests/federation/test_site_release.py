"""A site with record-level DP asked again for a round it answered (issue 12, point 2): the same
question gets the same release, uncharged; any other question is trained and charged; a damaged or
foreign release file is never re-sent. Through the real site path: fedcore's ClientApp with its
state folder on disk, and the real server (``run_server``) killed after the sites released."""

from __future__ import annotations

import io
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import clients.app as client_app
from fedcore.config import resolve
from fedcore.errors import RemoteProtocolError
from fedcore.federation import messages as m
from fedcore.federation.server.checkpoint import read_checkpoint
from fedcore.federation.server.serve import initial_model, resume_settings, run_server
from fedcore.federation.simulation import batched
from fedcore.federation.site import release as site_release
from fedcore.federation.site.data import data_settings, site_data
from fedcore.federation.site.rounds import SiteUpdate, train_round
from fedcore.federation.site.secagg import SECAGG
from fedcore.federation.site.store import SiteStore
from tests.federation.conftest import FakeGrid, honest

RUN_A = "a" * 32
RUN_B = "b" * 32
BASE = [
    "dataset=synthetic",
    "synthetic.samples=600",
    "sites=2",
    "local_epochs=1",
    "round_timeout=5",
    "seed=3",
]


def _settings(*extra):
    return resolve(
        overrides=[*BASE, "rounds=3", "dp.site.epsilon=50", "dp.site.noise_multiplier=1.0", *extra]
    )


class Site:
    """Site 0 as a deployed SuperNode runs it: fedcore's ClientApp, its state folder on disk."""

    def __init__(self, settings, root):
        self.settings, self.root = settings, root
        from fedcore.data import load_holdout

        _, self.input_shape, self.num_classes = load_holdout(data_settings(settings))
        model = initial_model(settings, input_shape=self.input_shape, num_classes=self.num_classes)
        self.model = m.state_to_record(model.state_dict())
        self.store = SiteStore(root, 0)

    def context(self):
        return Context(
            run_id=1,
            node_id=1,
            node_config={"partition-id": 0, "num-partitions": 2, "state-dir": str(self.root)},
            state=RecordDict(),  # a fresh ClientApp process per message, as in deployment
            run_config=self.settings.to_run_config(),
        )

    def message(self, *, server_round=1, run_id=RUN_A, arrays=None):
        config = m.train_config(
            server_round=server_round,
            num_classes=self.num_classes,
            input_shape=self.input_shape,
            run_id=run_id,
        )
        content = RecordDict({m.ARRAYS: arrays or self.model, m.CONFIG: config})
        return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)

    def ask(self, **kwargs):
        """The site's reply, as (arrays as numpy, metrics)."""
        reply = client_app.app(self.message(**kwargs), self.context())
        assert not reply.has_error(), reply.error.reason
        arrays = {k: v.numpy().copy() for k, v in reply.content[m.ARRAYS].items()}
        return arrays, dict(reply.content[m.METRICS])

    def charged_rounds(self):
        """The rounds of the charges in the site's ledger file, as written on disk."""
        doc = json.loads(self.store.ledger_path.read_text())
        return [entry["round"] for entry in doc["entries"]]


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture
def site(tmp_path):
    return Site(_settings(), tmp_path / "state")


def test_the_same_round_asked_twice_gets_the_same_release_charged_once(site):
    first, metrics = site.ask()
    assert site.charged_rounds() == [1]
    again, metrics_again = site.ask()
    assert _same(first, again)
    assert metrics_again == metrics  # the epsilon it reported then, the weight 1
    assert site.charged_rounds() == [1]
    assert site.store.release_path(RUN_A).stat().st_mode & 0o777 == 0o600


def test_a_different_global_model_for_the_same_round_is_a_new_release(site):
    first, _ = site.ask()
    other = ArrayRecord({k: Array(v.numpy() + 0.01) for k, v in site.model.items()})
    second, _ = site.ask(arrays=other)
    assert not _same(first, second)
    assert site.charged_rounds() == [1, 1]
    # Only the latest release of the run is kept: the first question now trains again.
    third, _ = site.ask()
    assert not _same(first, third)
    assert site.charged_rounds() == [1, 1, 1]


def test_a_later_round_is_trained_and_charged(site):
    first, _ = site.ask(server_round=1)
    second, _ = site.ask(server_round=2)
    assert not _same(first, second)
    assert site.charged_rounds() == [1, 2]


def _damage_tensor(path):
    """Change one weight of the stored update, keeping its old checksum."""
    doc = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
    name = next(iter(doc["arrays"]))
    doc["arrays"][name].view(-1)[0] += 1.0
    buffer = io.BytesIO()
    torch.save(doc, buffer)
    path.write_bytes(buffer.getvalue())


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def _garbage(path):
    path.write_bytes(b"not a release at all")


@pytest.mark.parametrize("damage", [_damage_tensor, _truncate, _garbage])
def test_a_damaged_release_is_never_re_sent_the_site_trains_and_is_charged(site, damage, caplog):
    first, _ = site.ask()
    damage(site.store.release_path(RUN_A))
    with caplog.at_level(logging.WARNING, logger="fedcore.federation.site.release"):
        again, _ = site.ask()
    assert "ignoring the release file" in caplog.text
    assert not _same(first, again)  # fresh DP-SGD noise: not the (damaged) stored update
    assert site.charged_rounds() == [1, 1]
    # The new release replaced the damaged file and is re-sent from now on.
    third, _ = site.ask()
    assert _same(again, third) and site.charged_rounds() == [1, 1]


def test_a_release_file_that_is_not_private_is_not_re_sent(site, caplog):
    first, _ = site.ask()
    site.store.release_path(RUN_A).chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="fedcore.federation.site.release"):
        again, _ = site.ask()
    assert "mode 0644" in caplog.text
    assert not _same(first, again) and site.charged_rounds() == [1, 1]


def test_a_release_planted_from_another_run_is_not_re_sent(site, caplog):
    first, _ = site.ask(run_id=RUN_A)
    # Another run's file put where run B's would be (an attacker, or an operator's copy).
    shutil.copy(site.store.release_path(RUN_A), site.store.release_path(RUN_B))
    site.store.release_path(RUN_B).chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="fedcore.federation.site.release"):
        second, _ = site.ask(run_id=RUN_B)
    assert f"belongs to run {RUN_A}" in caplog.text
    assert not _same(first, second)
    assert site.charged_rounds() == [1, 1]


def test_without_record_level_dp_nothing_is_kept(tmp_path):
    site = Site(resolve(overrides=[*BASE, "rounds=3"]), tmp_path / "state")
    assert site_release.release_key(site.message(), site.settings) is None
    site.ask()
    assert site.store.release_paths() == [] and not site.store.ledger_path.exists()


def test_without_a_run_id_nothing_is_kept_and_every_ask_is_charged(site):
    first, _ = site.ask(run_id=None)
    second, _ = site.ask(run_id=None)
    assert not _same(first, second)
    assert site.charged_rounds() == [1, 1]
    assert site.store.release_paths() == []


def test_a_malformed_run_id_is_refused(site):
    reply = client_app.app(site.message(run_id="../../etc/passwd"), site.context())
    assert reply.has_error() and "fedcore-run-id" in reply.error.reason
    assert not site.store.ledger_path.exists() or site.charged_rounds() == []
    with pytest.raises(RemoteProtocolError):
        m.read_run_id(
            m.train_config(server_round=1, num_classes=2, input_shape=(2,), run_id="A" * 32)
        )


def test_a_spent_budget_still_re_sends_what_it_released_and_declines_anything_new(tmp_path):
    # One round at these sizes (300 records, z = 1) costs epsilon 2.61, two cost more than 3.
    site = Site(_settings("dp.site.epsilon=3.0"), tmp_path / "state")
    first, _ = site.ask(server_round=1)
    again, _ = site.ask(server_round=1)
    assert _same(first, again)
    reply = client_app.app(site.message(server_round=2), site.context())
    assert m.declined_reason(reply) is not None
    assert site.charged_rounds() == [1]
    assert [p.name for p in site.store.release_paths()] == [f"site-0.release.{RUN_A}.pt"]


def test_only_the_last_runs_releases_are_kept(site):
    runs = [f"{i:032x}" for i in range(site_release.KEEP_RUNS + 2)]
    for run in runs:
        site.ask(run_id=run)
    kept = {p.name for p in site.store.release_paths()}
    assert kept == {f"site-0.release.{r}.pt" for r in runs[-site_release.KEEP_RUNS :]}


def test_under_secure_aggregation_a_release_is_never_re_sent(tmp_path):
    """Secure aggregation never puts an update it sent into a new session: no key for a stage
    message, and the setting alone turns the cache off."""
    settings = _settings("secagg.enabled=true", "secagg.threshold=2")
    site = Site(settings, tmp_path / "state")
    msg = site.message()
    assert site_release.release_key(msg, settings) is None
    without = _settings()
    assert site_release.release_key(msg, without) is not None
    msg.content[SECAGG] = ConfigRecord({"stage": "masked_input"})
    assert site_release.release_key(msg, without) is None
    # Even given a key, a site under secure aggregation trains and is charged afresh.
    key = site_release.release_key(site.message(), without)
    node_config = site.context().node_config
    data = site_data(settings, node_config)
    outcomes = [
        train_round(
            settings,
            site=data,
            global_state=m.record_to_state(site.model),
            num_classes=site.num_classes,
            input_shape=site.input_shape,
            server_round=1,
            node_config=node_config,
            release=key,
        )
        for _ in range(2)
    ]
    assert all(isinstance(o, SiteUpdate) for o in outcomes)
    assert not all(
        torch.equal(outcomes[0].state[k], outcomes[1].state[k]) for k in outcomes[0].state
    )
    assert site.charged_rounds() == [1, 1]
    assert site.store.release_paths() == []


# ----------------------------------------------------------------------------- a resumed run


class _Killed(BaseException):
    pass


class _DiesAfterRelease(FakeGrid):
    """The server "dies" right after the sites' replies of round ``die_in_round`` came back: the
    sites released (and were charged for) that round, the server never completed it."""

    def __init__(self, settings, behaviours, *, die_in_round):
        super().__init__(settings, behaviours)
        self.die_in_round, self.trains = die_in_round, 0

    def send_and_receive(self, messages, *, timeout):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if messages and messages[0].metadata.message_type == "train":
            self.trains += 1
            if self.trains == self.die_in_round:
                raise _Killed
        return replies


def _history(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def _released(store, run_id):
    return torch.load(io.BytesIO(store.release_path(run_id).read_bytes()), weights_only=True)


class _Recording:
    """Sites that keep every train reply they send, per site (a batched reply holds several)."""

    def __init__(self):
        self.sent: list[dict[int, dict[str, np.ndarray]]] = []

    def __call__(self, msg, context):
        reply = honest(msg, context)
        if msg.metadata.message_type == "train" and not reply.has_error():
            per_site = {}
            for key, record in reply.content.array_records.items():
                if key == m.ARRAYS:
                    site = int(reply.content[m.METRICS][m.SITE_ID])
                else:  # a batched reply: s<site>.arrays
                    site = int(key.removeprefix("s").removesuffix("." + m.ARRAYS))
                per_site[site] = {k: v.numpy().copy() for k, v in record.items()}
            self.sent.append(per_site)
        return reply


@pytest.mark.parametrize("nodes", [2, 1], ids=["one-site-per-node", "batched"])
def test_a_round_released_then_resumed_is_re_sent_and_charged_once(tmp_path, monkeypatch, nodes):
    out = tmp_path / "run"
    settings = _settings(f"out={out}")
    if nodes < settings.sites:
        monkeypatch.setenv(batched.NODES_ENV, str(nodes))
    sites = {100 + i: honest for i in range(nodes)}
    with pytest.raises(_Killed):
        run_server(_DiesAfterRelease(settings, sites, die_in_round=2), settings, out)
    assert read_checkpoint(out).round == 1
    run_id = json.loads((out / "config.json").read_text())["fedcore_run_id"]
    stores = [SiteStore(out / "sites", s) for s in range(settings.sites)]
    released = {}
    for store in stores:
        assert [e["round"] for e in json.loads(store.ledger_path.read_text())["entries"]] == [1, 2]
        kept = _released(store, run_id)
        assert kept["round"] == 2
        released[store.site_id] = {k: v.numpy() for k, v in kept["arrays"].items()}

    resumed = resume_settings(out, {})
    recording = _Recording()
    grid = FakeGrid(resumed, {200 + i: recording for i in range(nodes)})
    record = run_server(grid, resumed, out)  # new processes, new node ids, the same record
    assert record.run_id == run_id
    assert [r["round"] for r in _history(out)] == [1, 2, 3]
    # The resumed round 2 got exactly what each site released before the kill ...
    round2 = {
        site: arrays
        for sent in recording.sent[: len(recording.sent) // 2]
        for site, arrays in sent.items()
    }
    assert set(round2) == {0, 1}
    assert all(_same(round2[s], released[s]) for s in round2)
    # ... and every site's ledger holds one charge per round it released.
    for store in stores:
        entries = json.loads(store.ledger_path.read_text())["entries"]
        assert [e["round"] for e in entries] == [1, 2, 3]
        assert _released(store, run_id)["round"] == 3
