"""``ray_address``: a federation on an existing two-node Ray cluster (issue 13, point 6).

The test starts a Ray head and a second Ray node on this machine (loopback), each with
``ray start --block`` in a session of its own, runs ``fedcore simulate`` against the head's
address, and stops the two process groups it started (by their ids) however the test ends. The
head offers no CPU, so every site must run on the second node: a run that ignored ``ray_address``
and started Ray locally would still train, so the test also finds fedcore's job in the cluster's
job table.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cluster_query(address: str, code: str, env: dict[str, str]) -> str:
    start = f"import ray; ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)"
    script = f"{start}; {code}"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    return done.stdout.strip()


def _stop(process: subprocess.Popen) -> None:
    """Stop a ``ray start --block`` we started: SIGTERM to its process group, then SIGKILL."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    try:  # daemons left in the group after the leader exited
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_a_federation_runs_on_an_existing_two_node_ray_cluster(tmp_path):
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FEDCORE_APP_DIR": str(ROOT),
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_memory_monitor_refresh_ms": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    # A private temp dir: by default `ray start --head` writes /tmp/ray/ray_current_cluster,
    # which every later `ray.init()` on this machine would join instead of starting its own Ray.
    temp_dir = tempfile.mkdtemp(prefix="fcray", dir="/tmp")  # short: Ray's socket paths
    common = [
        "--block",
        "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
    ]
    started: list[subprocess.Popen] = []
    try:
        started.append(
            subprocess.Popen(
                [str(RAY), "start", "--head", f"--port={port}", "--num-cpus=0",
                 "--include-dashboard=false", *common],
                env=env, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        time.sleep(5)
        started.append(
            subprocess.Popen(
                [str(RAY), "start", f"--address={address}", "--num-cpus=2", *common],
                env=env, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        deadline = time.monotonic() + 120
        alive = ""
        while time.monotonic() < deadline and alive != "2":
            alive = _cluster_query(address, "print(sum(1 for n in ray.nodes() if n['Alive']))", env)
            time.sleep(1)
        assert alive == "2", "the two-node Ray cluster did not come up"

        out = tmp_path / "run"
        subprocess.run(
            [sys.executable, "-m", "fedcore.cli", "simulate", "--out", str(out),
             "--set", f"ray_address={address}", "--set", "sites=6", "--set", "rounds=2",
             "--set", "dataset=synthetic", "--set", "local_epochs=1",
             "--set", "round_timeout=120"],
            env=env, cwd=tmp_path, check=True, timeout=600,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
        assert [(r["sites_sampled"], r["sites_replied"]) for r in rows] == [(6, 6), (6, 6)]
        assert json.loads((out / "status.json").read_text())["status"] == "completed"
        jobs = _cluster_query(address, "print(len(ray._private.state.state.job_table()))", env)
        assert int(jobs) >= 2, "fedcore's run did not join the cluster"  # fedcore's + this query
    finally:
        for process in reversed(started):
            _stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert (
        not Path("/tmp/ray/ray_current_cluster").exists()
        or address not in Path("/tmp/ray/ray_current_cluster").read_text()
    ), "the test's cluster was advertised to every Ray on this machine"


def test_on_a_cluster_ray_is_joined_not_sized():
    """Ray refuses CPU counts when joining a cluster: the cluster's own resources count."""
    from fedcore.config import resolve
    from fedcore.federation.simulation.engine import backend_config

    backend = backend_config(resolve(overrides=["ray_address=10.0.0.5:6379", "client_cpus=2"]))
    assert backend["init_args"] == {"address": "10.0.0.5:6379", "log_to_driver": False}
    assert backend["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.0}
    local = backend_config(resolve(overrides=[]))
    # Without ray_address a run starts its own cluster, never joins one `ray start` left behind
    assert local["init_args"]["address"] == "local" and local["init_args"]["num_cpus"] >= 1
