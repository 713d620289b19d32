"""The run record says what ran: privacy mode, dataset identity, commit, device, node-to-site map."""

import json
import subprocess
import sys
from pathlib import Path

from fedcore.config import resolve
from fedcore.federation.server.serve import run_server
from fedcore.provenance import content_sha256, dataset_identity
from fedcore.report import privacy_mode
from tests.federation.conftest import FakeGrid, honest

ROOT = Path(__file__).resolve().parents[2]


def test_record_names_device_commit_dataset_and_which_node_is_which_site(tmp_path, small_settings):
    grid = FakeGrid(small_settings, {101: honest, 102: honest, 103: honest})
    run_server(grid, small_settings, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["device"] == "cpu"
    assert {"fedcore_commit", "dataset_path", "dataset_sha256"} <= config.keys()
    assert config["dataset_path"] is None  # a built-in dataset: its name and seed identify it
    sites = json.loads((tmp_path / "run" / "sites.json").read_text())["node_to_site"]
    # The fake grid gives partition-id i to the i-th node.
    assert sites == {"101": 0, "102": 1, "103": 2}
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "**Privacy**: no privacy protection" in summary


def test_a_local_dataset_is_recorded_by_resolved_path_and_content_hash(tmp_path, monkeypatch):
    import numpy as np

    np.savez(tmp_path / "data.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]))
    monkeypatch.chdir(tmp_path)
    identity = dataset_identity(resolve(overrides=["dataset=data.npz"]))
    assert identity["dataset_path"] == str((tmp_path / "data.npz").resolve())
    before = identity["dataset_sha256"]
    assert before == content_sha256(tmp_path / "data.npz") and len(before) == 64
    np.savez(tmp_path / "data.npz", x=np.ones((4, 2)), y=np.array([0, 1, 0, 1]))
    assert content_sha256(tmp_path / "data.npz") != before


def test_privacy_mode_names_every_protection_and_its_parameters():
    text = privacy_mode(
        resolve(
            overrides=[
                "sites=3",
                "secagg.enabled=true",
                "secagg.mode=active",
                "dp.site.epsilon=8",
                "dp.site.noise_multiplier=1.1",
                "dp.server.epsilon=20",
                "dp.server.noise_multiplier=0.7",
                "fraction_train=0.5",
            ]
        )
    )
    for fragment in (
        "secure aggregation (active",
        "DP-SGD (eps 8",
        "noise 1.1",
        "DP-FedAvg (eps 20",
        "noise 0.7",
        "sampling rate 0.5",
    ):
        assert fragment in text, text


def test_version():
    result = subprocess.run(
        [sys.executable, "-m", "fedcore.cli", "--version"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0 and result.stdout.startswith("fedcore 0.")


def test_waiting_for_sites_prints_a_line_every_few_seconds(monkeypatch):
    import io

    from rich.console import Console

    from fedcore.federation.server import progress
    from fedcore.federation.server.driver import wait_for_sites

    clock = iter(range(0, 1000))
    monkeypatch.setattr(progress.time, "monotonic", lambda: float(next(clock)))
    out = io.StringIO()
    reporter = progress.RichReporter(Console(file=out, width=120))

    class Grid:
        calls = 0

        def get_node_ids(self):
            Grid.calls += 1
            return [1] if Grid.calls < 12 else [1, 2]

    monkeypatch.setattr("fedcore.federation.server.driver.time.sleep", lambda s: None)
    assert wait_for_sites(Grid(), expected=2, timeout=1e9, reporter=reporter) == 2
    lines = [line for line in out.getvalue().splitlines() if "waiting for sites" in line]
    assert lines and all(line == "waiting for sites: 1/2 connected" for line in lines)
    assert 1 < len(lines) < 11  # throttled: not one per poll


def test_a_site_logs_its_own_failure_with_the_reason_it_sends(caplog, small_settings):
    import logging

    from tests.federation.conftest import raises_config_error_in_train

    grid = FakeGrid(small_settings, {101: raises_config_error_in_train})
    from flwr.app import ArrayRecord, Message, RecordDict
    from flwr.common import MessageType

    from fedcore.federation import messages as m

    content = RecordDict(
        {
            m.ARRAYS: ArrayRecord({}),
            m.CONFIG: m.train_config(server_round=1, num_classes=10, input_shape=(64,)),
        }
    )
    msg = Message(content=content, dst_node_id=101, message_type=MessageType.TRAIN)
    flwr_logger = logging.getLogger("flwr")
    saved, flwr_logger.propagate = flwr_logger.propagate, True
    try:
        with caplog.at_level(logging.WARNING, logger="flwr"):
            (reply,) = grid.send_and_receive([msg], timeout=5)
    finally:
        flwr_logger.propagate = saved
    assert reply.has_error()
    assert any(reply.error.reason in rec.getMessage() for rec in caplog.records), caplog.text


def test_string_labels_are_recorded_with_their_class_index(tmp_path):
    import pandas as pd

    from fedcore.provenance import label_mapping

    frame = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0], "label": ["dog", "cat", "dog", "emu"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    settings = resolve(overrides=[f"dataset={tmp_path / 'd.csv'}"])
    assert label_mapping(settings) == {"0": "cat", "1": "dog", "2": "emu"}
    # The same order the loader encodes with: sorted unique values.
    from fedcore.data.arrays import encode_labels

    codes, classes = encode_labels(frame["label"].to_numpy(), source="t")
    assert [label_mapping(settings)[str(c)] for c in codes] == list(frame["label"])
    frame.assign(label=[0, 1, 0, 1]).to_csv(tmp_path / "n.csv", index=False)
    assert label_mapping(resolve(overrides=[f"dataset={tmp_path / 'n.csv'}"])) is None
