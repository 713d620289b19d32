"""A run's life through the real server code: every strategy learns and keeps the model's dtype, a
run whose rounds all fail stops as failed, and a run killed mid-way resumes to the same model."""

import json

import numpy as np
import pytest
import torch

from fedcore.config import resolve
from fedcore.errors import ConfigError
from fedcore.federation.server.checkpoint import CHECKPOINT_FILE, read_checkpoint
from fedcore.federation.server.serve import close_interrupted, resume_settings, run_server
from fedcore.federation.server.strategies import DEFAULT_SERVER_LR, build_strategy, server_lr
from tests.federation.conftest import FakeGrid, honest, raises_config_error_in_train


def _history(path):
    return [json.loads(line) for line in (path / "history.jsonl").read_text().splitlines()]


def _status(path):
    return json.loads((path / "status.json").read_text())


STRATEGIES = ["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_three_rounds_learns_and_keeps_float32(tmp_path, strategy):
    settings = resolve(
        overrides=[
            "sites=3",
            "rounds=3",
            "local_epochs=1",
            "round_timeout=5",
            f"strategy={strategy}",
        ]
    )
    grid = FakeGrid(settings, {101: honest, 102: honest, 103: honest})
    record = run_server(grid, settings, tmp_path / "run")
    rows = _history(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2, 3]
    # Before the fix, FedAdam's float64 model made every later reply fail the dtype check.
    assert all(r["sites_replied"] == 3 and not r["round_failed"] for r in rows), rows
    assert rows[-1]["eval_accuracy"] > record.initial_accuracy
    state = torch.load(tmp_path / "run" / "model.pt")
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert _status(tmp_path / "run")["status"] == "completed"


def test_server_lr_defaults_are_flowers_and_the_key_still_overrides():
    assert server_lr(resolve(overrides=["strategy=fedavgm"])) == 1.0
    assert build_strategy(resolve(overrides=["strategy=fedavgm"])).server_learning_rate == 1.0
    assert (
        build_strategy(resolve(overrides=["strategy=fedyogi"])).eta == DEFAULT_SERVER_LR["fedyogi"]
    )
    assert build_strategy(resolve(overrides=["strategy=fedadam", "server_lr=0.3"])).eta == 0.3
    assert server_lr(resolve(overrides=["strategy=fedavg"])) is None


def test_a_run_whose_last_k_rounds_all_fail_stops_as_failed_naming_the_reason(tmp_path):
    settings = resolve(
        overrides=[
            "sites=2",
            "rounds=6",
            "local_epochs=1",
            "round_timeout=5",
            "max_failed_rounds=2",
        ]
    )
    bad = raises_config_error_in_train
    record = run_server(FakeGrid(settings, {101: bad, 102: bad}), settings, tmp_path / "run")
    rows = _history(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2]  # stopped after K=2, not 6 rounds
    assert all(r["round_failed"] and r["sites_replied"] == 0 for r in rows)
    status = _status(tmp_path / "run")
    assert status["status"] == "failed" and "the last 2 rounds all failed" in status["reason"]
    assert "ConfigError" in status["reason"]  # the reason seen most often
    assert "failed" in (tmp_path / "run" / "summary.md").read_text()
    assert len(record.rows) == 2


def test_one_failing_site_is_not_a_failed_round(tmp_path):
    settings = resolve(
        overrides=[
            "sites=2",
            "rounds=2",
            "local_epochs=1",
            "round_timeout=5",
            "max_failed_rounds=1",
        ]
    )
    grid = FakeGrid(settings, {101: honest, 102: raises_config_error_in_train})
    run_server(grid, settings, tmp_path / "run")
    rows = _history(tmp_path / "run")
    assert len(rows) == 2 and not any(r["round_failed"] for r in rows)
    assert _status(tmp_path / "run")["status"] == "completed"


class _Killed(BaseException):
    pass


class _DiesAfter(FakeGrid):
    """A grid whose server process "dies" (raises a BaseException) in the middle of round ``r``."""

    def __init__(self, settings, behaviours, *, die_in_round):
        super().__init__(settings, behaviours)
        self.die_in_round = die_in_round

    def send_and_receive(self, messages, *, timeout):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            rnd = int(messages[0].content.config_records["config"]["server-round"])
            if rnd == self.die_in_round:
                raise _Killed
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize("strategy", ["fedadam", "fedavgm"])
def test_killed_then_resumed_ends_with_the_uninterrupted_model(tmp_path, strategy):
    """Server optimizer memory, round number and history all survive; rounds appear once."""
    base = ["sites=3", "rounds=4", "local_epochs=1", "round_timeout=5", f"strategy={strategy}"]
    settings = resolve(overrides=base)
    sites = {101: honest, 102: honest, 103: honest}
    run_server(FakeGrid(settings, sites), settings, tmp_path / "whole")

    with pytest.raises(_Killed):
        run_server(_DiesAfter(settings, sites, die_in_round=3), settings, tmp_path / "cut")
    assert read_checkpoint(tmp_path / "cut").round == 2
    resumed = resume_settings(tmp_path / "cut", {})
    assert resumed.resume and resumed.out == str(tmp_path / "cut")
    # Fresh sites (new processes, new node ids): the resumed run depends on nothing in memory.
    run_server(
        FakeGrid(resumed, {201: honest, 202: honest, 203: honest}), resumed, tmp_path / "cut"
    )

    rows = _history(tmp_path / "cut")
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    whole = torch.load(tmp_path / "whole" / "model.pt")
    cut = torch.load(tmp_path / "cut" / "model.pt")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    assert _status(tmp_path / "cut")["status"] == "completed"
    assert [r["eval_accuracy"] for r in rows] == [
        r["eval_accuracy"] for r in _history(tmp_path / "whole")
    ]


def test_resume_refuses_settings_that_change_the_federation(tmp_path, small_settings):
    run_server(
        FakeGrid(small_settings, {101: honest, 102: honest, 103: honest}),
        small_settings,
        tmp_path / "run",
    )
    with pytest.raises(ConfigError, match="lr=0.5"):
        resume_settings(tmp_path / "run", {"lr": 0.5})
    assert resume_settings(tmp_path / "run", {"round_timeout": 9.0, "rounds": 3}).rounds == 3
    with pytest.raises(ConfigError, match="no run record"):
        resume_settings(tmp_path / "nothing", {})
    # A different run's settings cannot be pointed at this record.
    other = resolve(
        overrides=["sites=3", "rounds=3", "seed=7", "resume=true", f"out={tmp_path / 'run'}"]
    )
    with pytest.raises(ConfigError, match="seed"):
        run_server(FakeGrid(other, {101: honest}), other, tmp_path / "run")


def test_close_interrupted_writes_last_round_model_and_status(tmp_path, small_settings):
    sites = {101: honest, 102: honest, 103: honest}
    with pytest.raises(_Killed):
        run_server(
            _DiesAfter(small_settings, sites, die_in_round=2), small_settings, tmp_path / "run"
        )
    assert close_interrupted(tmp_path / "run", reason="SIGINT") == 1
    checkpoint = read_checkpoint(tmp_path / "run")
    model = torch.load(tmp_path / "run" / "model.pt")
    assert all(torch.equal(model[k], checkpoint.arrays[k]) for k in model)
    assert _status(tmp_path / "run") == {
        "status": "interrupted",
        "reason": "SIGINT",
        "rounds_completed": 1,
    }
    assert "interrupted after round 1" in (tmp_path / "run" / "summary.md").read_text()
    assert [r["round"] for r in _history(tmp_path / "run")] == [1]
    assert (tmp_path / "run" / CHECKPOINT_FILE).exists()


def test_checkpoint_keeps_the_servers_random_state(tmp_path, small_settings):
    import random

    run_server(
        FakeGrid(small_settings, {101: honest, 102: honest, 103: honest}),
        small_settings,
        tmp_path / "run",
    )
    from fedcore.federation.server.checkpoint import restore_random_state

    checkpoint = read_checkpoint(tmp_path / "run")
    restore_random_state(checkpoint.random_state)
    a = (random.random(), np.random.random())
    restore_random_state(checkpoint.random_state)
    assert (random.random(), np.random.random()) == a


class _DiesInEvaluate(FakeGrid):
    """The server dies after round ``r``'s training was released (and charged), before the round
    completed."""

    def __init__(self, settings, behaviours, *, die_in_round):
        super().__init__(settings, behaviours)
        self.die_in_round = die_in_round
        self.trained = 0

    def send_and_receive(self, messages, *, timeout):
        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else ""
        if kind == "train":
            self.trained += 1
        elif kind == "evaluate" and self.trained == self.die_in_round:
            raise _Killed
        return super().send_and_receive(messages, timeout=timeout)


def test_a_round_charged_but_not_completed_stays_charged_and_its_retry_is_a_new_charge(tmp_path):
    from fedcore.privacy import PrivacyLedger
    from fedcore.privacy.ledger import FEDERATION_LEDGER_FILE as LEDGER_FILE

    out = tmp_path / "run"
    settings = resolve(
        overrides=[
            "sites=3",
            "rounds=3",
            "local_epochs=1",
            "round_timeout=5",
            "dp.server.epsilon=50",
            "dp.server.noise_multiplier=1.0",
            "dp.server.clipping=adaptive",
        ]
    )
    sites = {101: honest, 102: honest, 103: honest}
    with pytest.raises(_Killed):
        run_server(_DiesInEvaluate(settings, sites, die_in_round=2), settings, out)
    assert len(PrivacyLedger.load(out / LEDGER_FILE).entries) == 2  # round 2 was released
    checkpoint = read_checkpoint(out)
    assert checkpoint.round == 1 and checkpoint.clip_norm is not None
    resumed = resume_settings(out, {})
    run_server(FakeGrid(resumed, sites), resumed, out)
    ledger = PrivacyLedger.load(out / LEDGER_FILE)
    # Never rolled back: the lost release of round 2, then rounds 2 and 3 again.
    assert len(ledger.entries) == 4
    rows = _history(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[-1]["server_epsilon"] == pytest.approx(ledger.epsilon())
