"""The round driver: honest rounds, and every kind of bad site dropped while the round goes on."""

import json
import math

import pytest

from fedcore.errors import ConfigError
from fedcore.federation.server.serve import run_server
from tests.federation.conftest import (
    FakeGrid,
    honest,
    inf_update,
    nan_update,
    raises_config_error_in_train,
    silent,
    wrong_shape,
)


def _history(path):
    return [json.loads(line) for line in (path / "history.jsonl").read_text().splitlines()]


def test_honest_federation_writes_full_record_and_learns(tmp_path, small_settings):
    grid = FakeGrid(small_settings, {101: honest, 102: honest, 103: honest})
    record = run_server(grid, small_settings, tmp_path / "run")
    rows = _history(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert (row["sites_sampled"], row["sites_replied"], row["sites_failed"]) == (3, 3, 0)
        assert row["bytes_down"] > 0 and row["bytes_up"] > 0 and row["seconds"] > 0
        assert math.isfinite(row["train_loss"]) and 0 <= row["eval_accuracy"] <= 1
    assert rows[-1]["eval_accuracy"] > record.initial_accuracy
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["settings"]["sites"] == 3 and config["num_classes"] == 10
    for name in ("model.pt", "summary.md", "accuracy.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert "completed" in (tmp_path / "run" / "summary.md").read_text()


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (nan_update, "NaN or infinite"),
        (inf_update, "NaN or infinite"),
        (wrong_shape, "expected float32"),
        (silent, "no reply within"),
        (raises_config_error_in_train, "ConfigError"),
    ],
)
def test_bad_site_is_dropped_and_round_goes_on(tmp_path, small_settings, bad, reason):
    grid = FakeGrid(small_settings, {101: honest, 102: bad, 103: honest})
    record = run_server(grid, small_settings, tmp_path / "run")
    rows = _history(tmp_path / "run")
    assert len(rows) == 2
    for row in rows:
        assert (row["sites_replied"], row["sites_failed"]) == (2, 1)
        assert reason in row["failures"]["102"]
        assert math.isfinite(row["eval_loss"])
    assert rows[-1]["eval_accuracy"] > record.initial_accuracy


def test_round_with_no_usable_reply_keeps_the_model(tmp_path, small_settings):
    grid = FakeGrid(small_settings, {101: nan_update, 102: silent, 103: nan_update})
    record = run_server(grid, small_settings, tmp_path / "run")
    rows = _history(tmp_path / "run")
    assert [r["sites_replied"] for r in rows] == [0, 0]
    assert all(r["eval_accuracy"] == record.initial_accuracy for r in rows)
    assert rows[0]["train_loss"] is None


def test_existing_record_is_never_overwritten(tmp_path, small_settings):
    grid = FakeGrid(small_settings, {101: honest, 102: honest, 103: honest})
    run_server(grid, small_settings, tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds a run record"):
        run_server(grid, small_settings, tmp_path / "run")


def test_an_error_reply_the_superlink_writes_is_the_unavailable_nodes_failure():
    """Flower's SuperLink answers for a node that went away with an error reply from its own node
    id (1): the failure belongs to the node the request was sent to, and that node does not also
    count as 'no reply' (issue 23's hosts test found both)."""
    from flwr.app import Error, Message, RecordDict

    from fedcore.federation.server.driver import exchange

    class SuperLinkGrid:
        def send_and_receive(self, messages, *, timeout):
            replies = []
            for i, msg in enumerate(messages):
                msg.metadata.__dict__["_message_id"] = f"m{i}"  # as Flower's Grids set it
                reply = Message(Error(code=0, reason="Node Unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = 1
                replies.append(reply)
            return replies

    outgoing = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (7, 9)]
    result = exchange(SuperLinkGrid(), outgoing, timeout=1.0, check=lambda reply: None)
    assert set(result.failures) == {"7", "9"}
    assert all("Node Unavailable" in why for why in result.failures.values())
