"""`flwr stop` of a run on a simulation SuperLink leaves no process behind (issue 12, point 5),
and the run record closed as interrupted.

Flower 1.41: ``flwr run`` against a SuperLink started with ``--simulation`` makes it start one
``flwr-simulation`` process per run, which starts a local Ray cluster (GCS, raylet, dashboard,
monitors, workers, and the raylet's ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent``).
Without :mod:`fedcore.federation.simulation.ray_cleanup`, ``flwr stop`` left the two agents running, handed
to init, after every stopped run. Every process is tracked here by process id (and start time) as a
descendant of the SuperLink, since Ray's agents do not inherit ``FLWR_HOME``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from fedcore.deploy import commands as cmd
from fedcore.deploy.flwr_home import flower_env, free_port, port_open, write_run_config
from fedcore.deploy.processes import (
    ProcessId,
    ProcessSupervisor,
    _children_map,
    _descendants,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="needs /proc")]

HOST = "127.0.0.1"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def test_flwr_stop_leaves_no_process_of_the_run(tmp_path, request):
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    port = free_port(HOST)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "{HOST}:{port}"\ninsecure = true\n'
    )
    bin_dir = cmd.flower_bin_dir()
    env = {**flower_env(flwr_home, bin_dir), "RAY_memory_monitor_refresh_ms": "0"}
    seen: dict[ProcessId, str] = {}  # every descendant of the SuperLink ever seen
    supervisor = ProcessSupervisor(grace=5)
    try:
        superlink = supervisor.start(
            "superlink",
            cmd.superlink_argv(
                bin_dir, host=HOST, port=port, tls=None, node_auth=False, simulation=True
            ),
            env=env,
            cwd=tmp_path,
            log_path=tmp_path / "superlink.log",
        )
        assert wait_until(lambda: port_open(HOST, port), timeout=60), superlink.log_tail()
        run_config = write_run_config(
            tmp_path / "run.toml",
            {"sites": 2, "rounds": 50, "local_epochs": 1, "out": str(tmp_path / "record")},
        )
        started = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(request.config.rootpath), "sim",
             "--run-config", str(run_config),
             "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        found = re.search(r"Successfully started run (\d+)", started.stdout + started.stderr)
        assert found, started.stdout + started.stderr
        run_id = found.group(1)
        daemons = {superlink.ident}

        def snapshot() -> str:
            tree = _children_map()
            for pid in _descendants(superlink.pid, tree):
                ident = ProcessId.of(pid)
                if ident.start_time is not None:
                    # Ray's processes rename themselves once started: keep the latest name.
                    seen[ident] = _cmdline(pid) or seen.get(ident, "")
                    if "flower-superexec" in seen[ident]:
                        daemons.add(ident)  # the SuperLink's own helper lives on
            return " ".join(c for i, c in seen.items() if i.alive())

        def ray_up() -> bool:
            running = snapshot()
            return all(
                name in running for name in ("raylet", "ray::DashboardAgent", "ray::ClientAppActor")
            )

        assert wait_until(ray_up, timeout=75, interval=0.5), sorted(seen.values())
        record = tmp_path / "record"

        def a_round_done() -> bool:
            snapshot()
            history = record / "history.jsonl"
            return history.exists() and bool(history.read_text().strip())

        assert wait_until(a_round_done, timeout=120, interval=0.5)

        stopped = subprocess.run(
            [str(bin_dir / "flwr"), "stop", run_id, "sim"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        snapshot()

        def run_gone() -> bool:
            return not [i for i in seen if i not in daemons and i.alive()]

        wait_until(run_gone, timeout=30, interval=0.5)
        left = {i.pid: c for i, c in seen.items() if i not in daemons and i.alive()}
        assert left == {}, left
        assert superlink.running(), "the SuperLink itself keeps running after `flwr stop`"
        # ... and the record is closed, resumable, although the ServerApp's thread never saw it.
        status = json.loads((record / "status.json").read_text())
        assert status["status"] == "interrupted" and status["rounds_completed"] >= 1, status
        assert (record / "model.pt").exists() and (record / "summary.md").exists()
    finally:
        supervisor.stop_all()
        for ident in seen:  # whatever the test saw and is still there, by pid
            ident.signal(9)
