"""One writer per run record: a resume cannot start while the server of the run it continues is
alive (attacked with a second process holding the record), and the lock dies with its holder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcore.config import resolve
from fedcore.errors import RecordInUseError
from fedcore.federation import server
from fedcore.runrecord import WRITER_LOCK, check_not_in_use, record_writer
from tests.cli.test_preflight import fedcore, refused
from tests.federation.conftest import FakeGrid, flower_identity, honest  # noqa: F401 - a fixture

HOLD = (
    "import sys, time\n"
    "from fedcore.runrecord import record_writer\n"
    "with record_writer(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(600)\n"
)


def _holder(out: Path) -> subprocess.Popen:
    """Another process that holds ``out``'s writer lock until it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def test_a_second_writer_is_refused_and_named_until_the_first_dies(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        with pytest.raises(RecordInUseError, match=f"process {proc.pid}"), record_writer(out):
            pass
        started = time.monotonic()
        with pytest.raises(RecordInUseError), record_writer(out, wait=0.6):
            pass
        assert time.monotonic() - started >= 0.6  # it waited before refusing
    finally:
        _stop(proc)  # SIGKILL: the holder closes nothing itself; the kernel releases the lock
    with record_writer(out):
        assert (out / WRITER_LOCK).read_text().strip() == str(os.getpid())
    check_not_in_use(tmp_path / "never-made")
    assert not (tmp_path / "never-made").exists()


@pytest.mark.usefixtures("flower_identity")
def test_resume_is_refused_while_another_process_writes_the_record(tmp_path, monkeypatch):
    settings = resolve(overrides=["sites=2", "rounds=1", "local_epochs=1", "round_timeout=5"])
    out = tmp_path / "run"
    server.run_server(FakeGrid(settings, {1: honest, 2: honest}), settings, out)
    status = (out / "status.json").read_text()
    history = (out / "history.jsonl").read_text()
    proc = _holder(out)
    try:
        result, _ = fedcore("simulate", "--resume", str(out), "--set", "rounds=2")
        refused(result, f"being written by process {proc.pid}")
        # The server itself (as `flwr run` with resume=true starts it) waits, then refuses.
        monkeypatch.setattr(server, "WRITER_WAIT", 0.5)
        resumed = resolve(
            values={
                **json.loads((out / "config.json").read_text())["settings"],
                "rounds": 2,
                "resume": True,
                "out": str(out),
            }
        )
        with pytest.raises(RecordInUseError):
            server.run_server(FakeGrid(resumed, {1: honest, 2: honest}), resumed, out)
        assert (out / "status.json").read_text() == status  # nothing in the record touched
        assert (out / "history.jsonl").read_text() == history
    finally:
        _stop(proc)
    record = server.run_server(FakeGrid(resumed, {1: honest, 2: honest}), resumed, out)
    assert [r.round for r in record.rows] == [1, 2]
