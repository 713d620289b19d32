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
from fedcore.federation.server import serve as server
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


@pytest.fixture(autouse=True)
def _not_exiting():
    """close_open_records marks the process as exiting, for good (it is, in production)."""
    from fedcore.federation.server import exiting

    yield
    exiting._exiting.clear()


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


class _StoppedGrid(FakeGrid):
    """A grid whose run is stopped (as Flower does on `flwr stop`: SystemExit in the ServerApp)
    once ``after`` exchanges have been answered."""

    def __init__(self, settings, behaviours, *, after: int, stop: BaseException):
        super().__init__(settings, behaviours)
        self.after, self.stop = after, stop

    def send_and_receive(self, messages, *, timeout):
        if self.exchanges >= self.after:
            raise self.stop
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize("stop", [SystemExit(0), KeyboardInterrupt()])
def test_a_server_stopped_mid_run_closes_its_record_as_interrupted_and_resumable(tmp_path, stop):
    from fedcore.lifecycle import report

    settings = resolve(overrides=["sites=2", "rounds=3", "local_epochs=1", "round_timeout=5"])
    out = tmp_path / "run"
    grid = _StoppedGrid(settings, {1: honest, 2: honest}, after=3, stop=stop)  # in round 2
    with pytest.raises(type(stop)):
        server.run_server(grid, settings, out)
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "interrupted" and status["rounds_completed"] == 1, status
    assert "interrupted after round 1" in (out / "summary.md").read_text()
    assert (out / "model.pt").exists()
    assert report(out, settings) == 143  # not "failed: SystemExit: 0", exit 1
    resumed = server.resume_settings(out, {})
    record = server.run_server(FakeGrid(resumed, {1: honest, 2: honest}), resumed, out)
    assert [r.round for r in record.rows] == [1, 2, 3]


@pytest.mark.usefixtures("flower_identity")
def test_the_exit_handler_closes_a_record_whose_server_thread_never_sees_the_exit(tmp_path):
    """`flwr stop` on a simulation SuperLink: flwr-simulation exits while its ServerApp thread
    waits for replies; the exit handler closes the record that thread holds."""
    import threading

    settings = resolve(overrides=["sites=2", "rounds=3", "local_epochs=1", "round_timeout=5"])
    out = tmp_path / "run"
    waiting, release = threading.Event(), threading.Event()

    class Hanging(FakeGrid):
        def send_and_receive(self, messages, *, timeout):
            if self.exchanges >= 3:  # round 2: wait for replies that never come
                waiting.set()
                release.wait(30)
                raise RuntimeError("the process exited")
            return super().send_and_receive(messages, timeout=timeout)

    thread = threading.Thread(
        target=lambda: pytest.raises(
            RuntimeError,
            server.run_server,
            Hanging(settings, {1: honest, 2: honest}),
            settings,
            out,
        ),
        daemon=True,
    )
    thread.start()
    try:
        assert waiting.wait(60)
        assert server.close_open_records() == [out]
        status = json.loads((out / "status.json").read_text())
        assert status["status"] == "interrupted" and status["rounds_completed"] == 1, status
    finally:
        release.set()
        thread.join(30)
    # The thread's own failure afterwards does not turn the closed record into a failed one.
    assert json.loads((out / "status.json").read_text())["status"] == "interrupted"


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize("in_flwr_simulation", [True, False])
def test_a_run_whose_engine_dies_before_the_exit_is_closed_as_interrupted(
    tmp_path, monkeypatch, in_flwr_simulation
):
    """CI saw it: `flwr stop`, Ray died first, every site failed with ActorDiedError and the
    server closed the run as failed a moment before the exit handler ran. In flwr-simulation a
    failing server waits for the exit to claim its record (fedcore.federation.server.exiting);
    the control, outside flwr-simulation, closes it as failed at once."""
    import threading

    if in_flwr_simulation:
        monkeypatch.setattr(sys, "argv", ["/venv/bin/flwr-simulation"])
    settings = resolve(
        overrides=[
            "sites=2",
            "rounds=4",
            "local_epochs=1",
            "round_timeout=5",
            "max_failed_rounds=1",
        ]
    )
    out = tmp_path / "run"

    class EngineGone(FakeGrid):
        def send_and_receive(self, messages, *, timeout):
            if self.exchanges >= 3:  # round 2: the engine is gone, no site answers
                self.exchanges += 1
                return []
            return super().send_and_receive(messages, timeout=timeout)

    thread = threading.Thread(
        target=server.run_server,
        args=(EngineGone(settings, {1: honest, 2: honest}), settings, out),
        daemon=True,
    )
    thread.start()
    try:
        if in_flwr_simulation:
            # the server waits for the exit; the exit comes
            deadline = time.monotonic() + 60
            while (
                not (out / "history.jsonl").exists()
                or len((out / "history.jsonl").read_text().splitlines()) < 2
            ):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.5)
            assert not (out / "status.json").exists()  # not closed as failed meanwhile
            assert server.close_open_records() == [out]
        thread.join(60)
        assert not thread.is_alive()
        status = json.loads((out / "status.json").read_text())
        expected = "interrupted" if in_flwr_simulation else "failed"
        assert status["status"] == expected, status
    finally:
        thread.join(30)
