"""`fedcore simulate` as a user runs it: signals stop it cleanly, a killed run resumes to the same
model, and settings that cannot work are refused before Ray starts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedcore.deploy.processes import ProcessId, _children_map, _descendants

ROOT = Path(__file__).resolve().parents[2]
# Rounds slow enough (several seconds in all) that a signal lands mid-run.
LONG = ["--set", "sites=2", "--set", "rounds=40", "--set", "local_epochs=2", "--set", "seed=3"]


def start(*args, cwd=ROOT):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fedcore.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def rows(out):
    path = out / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_rounds(process, out, n, *, timeout=240):
    deadline = time.monotonic() + timeout
    while len(rows(out)) < n:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.2)


def tree(pid):
    return {ProcessId.of(p) for p in _descendants(pid, _children_map())}


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_closes_the_record_and_leaves_no_process(tmp_path, signum, code):
    out = tmp_path / "run"
    process = start("simulate", *LONG, "--out", str(out))
    wait_for_rounds(process, out, 2)
    started = tree(process.pid)
    assert (
        len(started) >= 3
    )  # the child, Ray's daemons and workers: the check below means something
    process.send_signal(signum)
    sent = time.monotonic()
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert time.monotonic() - sent < 30  # "within seconds" (generous: a shared 2-core machine)
    assert [p for p in started if p.alive()] == []
    status = json.loads((out / "status.json").read_text())
    done = status["rounds_completed"]
    assert status["status"] == "interrupted" and 2 <= done < 40
    assert f"received {signal.Signals(signum).name}" in status["reason"]
    assert [r["round"] for r in rows(out)] == list(range(1, done + 1))
    assert f"interrupted after round {done}" in (out / "summary.md").read_text()
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    model = torch.load(out / "model.pt")
    assert checkpoint["round"] == done
    assert all(torch.equal(model[k], checkpoint["arrays"][k]) for k in model)
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_uninterrupted_model(tmp_path):
    settings = [
        "--set",
        "sites=2",
        "--set",
        "rounds=40",  # a round takes ~0.1 s: enough of them that the kill lands mid-run
        "--set",
        "local_epochs=2",
        "--set",
        "seed=3",
    ]
    whole = tmp_path / "whole"
    process = start("simulate", *settings, "--out", str(whole))
    assert process.wait(timeout=300) == 0, process.communicate()

    cut = tmp_path / "cut"
    process = start("simulate", *settings, "--out", str(cut))
    wait_for_rounds(process, cut, 2)
    # The machine "dies": every process of the run is killed at once, nothing is closed.
    victims = {ProcessId.of(process.pid), *tree(process.pid)}
    for victim in victims:
        victim.signal(signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(v.alive() for v in victims) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (cut / "status.json").exists()

    resumed = start("simulate", "--resume", str(cut))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert [r["round"] for r in rows(cut)] == list(range(1, 41))
    a, b = torch.load(whole / "model.pt"), torch.load(cut / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((cut / "status.json").read_text())["status"] == "completed"
    # A finished record is not resumed again.
    again = start("simulate", "--resume", str(cut))
    _, err = again.communicate(timeout=60)
    assert again.returncode == 2 and "already ran 40 of 40 rounds" in err
