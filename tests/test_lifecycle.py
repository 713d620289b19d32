"""fedcore.lifecycle: how a run's end is told and reported."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from fedcore.config import resolve
from fedcore.lifecycle import EXIT_SIGNAL, report, signal_exit, stopped_by_signal


@pytest.mark.parametrize("returncode", [130, 143, 129, 137, -9, -15])
def test_a_signal_exit_is_no_result(returncode: int) -> None:
    assert stopped_by_signal(returncode)


@pytest.mark.parametrize("returncode", [0, 1, 2, 128])
def test_a_result_is_not_a_signal_exit(returncode: int) -> None:
    assert not stopped_by_signal(returncode)


def test_signal_exits_are_128_plus_the_signal() -> None:
    assert signal_exit(signal.SIGTERM) == 143 == EXIT_SIGNAL[signal.SIGTERM]
    assert signal_exit(signal.SIGKILL) == 137


def test_a_one_round_run_is_reported_in_the_singular(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    (tmp_path / "status.json").write_text(json.dumps({"status": "stopped", "reason": "budget"}))
    (tmp_path / "history.jsonl").write_text(json.dumps({"round": 1, "eval_accuracy": 0.5}) + "\n")
    assert report(tmp_path, resolve(overrides=["rounds=1"])) == 0
    out = capsys.readouterr().out
    assert "after 1 of 1 round:" in out and "after 1 round\n" in out
    assert "1 rounds" not in out
