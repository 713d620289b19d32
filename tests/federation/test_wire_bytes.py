"""The serialized bytes of every exchange and secure-aggregation stage, per round, in
``operator.jsonl`` (``bytes_by_stage``, ``wire_by_site``): the FakeGrid counts what it carries, by
stage and by node, and the record must say the same; a site that falls silent at a stage is
charged the request it was sent and no reply."""

import json
import stat

import pytest

from fedcore.config import resolve
from fedcore.federation.server.exchange import wire_bytes
from fedcore.federation.server.serve import run_server
from fedcore.runrecord import OPERATOR_FILE
from fedcore.secagg import Stage
from tests.federation.conftest import FakeGrid, honest
from tests.federation.test_secagg_rounds import _stage, failing_at

NODES = (101, 102, 103, 104)
SILENT = 104  # never answers the masked-input stage


class CountingGrid(FakeGrid):
    """A FakeGrid that counts the serialized bytes it carries, per (round, stage, node), with
    its own stage names: the secagg request's stage, else the message type."""

    def __init__(self, settings, behaviours):
        super().__init__(settings, behaviours)
        self.carried: dict[tuple[int, str, str], list[int]] = {}
        self.round = 1

    def send_and_receive(self, messages, *, timeout):
        messages = list(messages)
        stages = {str(msg.metadata.dst_node_id): _stage(msg) or msg.metadata.message_type
                  for msg in messages}  # fmt: skip
        for msg in messages:
            node = str(msg.metadata.dst_node_id)
            self._count(node, stages[node], 0, wire_bytes(msg))
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            node = str(reply.metadata.src_node_id)
            self._count(node, stages[node], 1, wire_bytes(reply))
        if set(stages.values()) == {"evaluate"}:  # a round ends with the sites' evaluation
            self.round += 1
        return replies

    def _count(self, node, stage, direction, size):
        key = (self.round, stage, node)
        self.carried.setdefault(key, [0, 0])[direction] += size


def _operator_rows(out):
    lines = (out / OPERATOR_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines]


def _expected(grid, server_round):
    stages, sites = {}, {}
    for (r, stage, node), (down, up) in grid.carried.items():
        if r != server_round:
            continue
        entry = stages.setdefault(stage, {"sent": 0, "received": 0, "messages": 0})
        entry["sent"] += down
        entry["received"] += up
        entry["messages"] += 1
        site = sites.setdefault(node, {"sent": 0, "received": 0})
        site["sent"] += down
        site["received"] += up
    return stages, sites


@pytest.mark.parametrize("mode", ["semi-honest", "active"])
def test_secagg_stage_bytes_match_what_the_grid_carried(tmp_path, mode):
    out = tmp_path / "run"
    settings = resolve(
        overrides=[
            "sites=4", "rounds=2", "local_epochs=1", "secagg.enabled=true", "secagg.timeout=5",
            f"secagg.mode={mode}", f"out={out}",
        ]
    )  # fmt: skip
    behaviours = {node: honest for node in NODES}
    behaviours[SILENT] = failing_at("masked_input", silent=True)
    grid = CountingGrid(settings, behaviours)
    run_server(grid, settings, out)
    rows = _operator_rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    public = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert all("bytes_by_stage" not in r and "wire_by_site" not in r for r in public)
    assert stat.S_IMODE((out / OPERATOR_FILE).stat().st_mode) == 0o600
    for row in rows:
        stages, sites = _expected(grid, row["round"])
        assert row["bytes_by_stage"] == stages, (row["bytes_by_stage"], stages)
        assert row["wire_by_site"] == sites
        masked = row["bytes_by_stage"][Stage.MASKED_INPUT.value]
        # the model and the masked input travel in this stage: the largest each way
        assert masked["sent"] == max(s["sent"] for s in row["bytes_by_stage"].values())
        assert masked["received"] == max(s["received"] for s in row["bytes_by_stage"].values())
        # the silent site was sent the model, and sent nothing back, at that stage
        silent = grid.carried[(row["round"], Stage.MASKED_INPUT.value, str(SILENT))]
        assert silent[0] > 0 and silent[1] == 0
        later = [s for s in (Stage.CONSISTENCY, Stage.UNMASK) if s.value in row["bytes_by_stage"]]
        assert later and all(row["bytes_by_stage"][s.value]["messages"] == 3 for s in later)
    assert ("enrol" in rows[0]["bytes_by_stage"]) == (mode == "active")
    assert "enrol" not in rows[1]["bytes_by_stage"]  # enrolled once


def test_plain_rounds_count_train_and_evaluate(tmp_path, small_settings):
    out = tmp_path / "plain"
    grid = CountingGrid(small_settings, {101: honest, 102: honest, 103: honest})
    run_server(grid, small_settings, out)
    rows = _operator_rows(out)
    public = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    for row, pub in zip(rows, public, strict=True):
        stages, sites = _expected(grid, row["round"])
        assert set(row["bytes_by_stage"]) == {"train", "evaluate"}
        assert row["bytes_by_stage"] == stages and row["wire_by_site"] == sites
        # serialized size: the payload (bytes_down, bytes_up) plus headers and metadata, no less
        sent = sum(s["sent"] for s in stages.values())
        received = sum(s["received"] for s in stages.values())
        assert pub["bytes_down"] < sent < pub["bytes_down"] * 1.05 + 6 * 2000, (pub, stages)
        assert pub["bytes_up"] < received < pub["bytes_up"] * 1.05 + 6 * 2000, (pub, stages)
