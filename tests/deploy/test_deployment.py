"""The deployment engine across real processes: SuperLink + 3 SuperNodes on 127.0.0.1 with TLS and
node authentication, 2 rounds of the fedcore app, the run record, an unregistered node refused,
and every process stopped.

What Flower 1.41 does with an unregistered node, as verified here: the SuperLink refuses to
activate it, the SuperNode logs ``Exit Code: 305`` ("Failed to activate SuperNode") and the
process exits with status 1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcore.config import SPECS, resolve
from fedcore.deploy.local import LocalDeployment
from fedcore.errors import ConfigError
from tests.deploy.conftest import processes_of

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="needs /proc")]

SECAGG_KEY = "secagg.enabled"


def _secagg_unavailable() -> str | None:
    """Why secure aggregation cannot be switched on yet, or None once it can."""
    if SECAGG_KEY not in SPECS:
        return f"setting {SECAGG_KEY!r} does not exist yet (issue 5)"
    try:
        resolve(overrides=[f"{SECAGG_KEY}=true"])
    except ConfigError as exc:
        return str(exc)
    return None


# Issue 6: "Runs 2 rounds of the fedcore app, with secure aggregation on once that issue has
# landed." It has, so the integration test runs with secure aggregation; a plain deployment is
# exercised by the Ctrl-C test below, and the plain federation by the simulation tests. (Running
# both cases here cost 5-8 minutes of CI on 2 cores.)
_SECAGG_SKIP = _secagg_unavailable()
SECAGG = [
    pytest.param(
        True,
        id="secagg",
        marks=pytest.mark.skipif(_SECAGG_SKIP is not None, reason=_SECAGG_SKIP or ""),
    ),
]
SMALL = ["sites=3", "rounds=2", "local_epochs=1", "round_timeout=120"]


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line]


@pytest.mark.parametrize("secagg", SECAGG)
def test_three_sites_tls_node_auth_two_rounds(tmp_path, secagg):
    # Secure aggregation in ACTIVE mode: each site is a fresh flwr-clientapp process per message,
    # so this also checks that the registry of signing keys works through the sites' state-dir.
    secure = [f"{SECAGG_KEY}=true", "secagg.mode=active"] if secagg else []
    settings = resolve(overrides=[*SMALL, *secure])
    out = tmp_path / "run"
    shown: list[str] = []
    deployment = LocalDeployment(
        settings, out_dir=out, workdir=tmp_path / "work", echo=shown.append
    )
    with deployment:
        deployment.make_certs(extra_sites=1)  # "stranger-0": a key pair that is never registered
        deployment.start_superlink()
        deployment.register_sites()
        deployment.start_supernodes()
        # The stranger tries to join while the run goes on; it must be refused.
        stranger = deployment.start_supernode(0, key_name="stranger-0", max_retries=0)
        # Secure aggregation takes four exchanges a round instead of one (each message starts a
        # flwr-clientapp process), so it gets a longer deadline.
        outcome = deployment.run(run_timeout=600 if secagg else 240)
        stranger.popen.wait(timeout=60)
        started = [p.ident for p in deployment.supervisor.processes]
        descendants = [d for p in deployment.supervisor.processes for d in p.descendants]
        flwr_home = deployment.flwr_home
        assert processes_of(flwr_home), "the deployment's processes should be visible while it runs"

    # 5. every process started, and every descendant seen, is gone
    assert [i for i in (*started, *descendants) if i.alive()] == []
    assert processes_of(flwr_home) == []

    # 4. the unregistered node was refused
    log = stranger.log_tail(200)
    assert stranger.returncode() == 1, log
    assert "Exit Code: 305" in log and "Failed to activate SuperNode" in log

    # 3. the run record
    assert outcome.returncode == 0, "\n".join(shown)
    rows = _history(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(
        r["sites_sampled"] == 3 and r["sites_replied"] == 3 and r["sites_failed"] == 0 for r in rows
    )
    config = json.loads((out / "config.json").read_text())
    assert json.dumps(config).count('"sites": 3') >= 1
    assert (
        (out / "model.pt").exists()
        and (out / "summary.md").exists()
        and (out / "accuracy.png").exists()
    )
    summary = (out / "summary.md").read_text()
    initial = float(
        re.search(r"initial model: loss \S+, accuracy ([0-9.]+)", "\n".join(shown)).group(1)
    )
    assert rows[-1]["eval_accuracy"] > initial + 0.1, (initial, rows)
    assert "completed" in summary
    if secagg:
        assert all(r["secagg"]["mode"] == "active" and len(r["secagg"]["survivors"]) == 3 for r in rows)
        assert len(list((out / "sites" / "secagg-registry").glob("*.ed25519.pub"))) == 3
    assert any(line.startswith("round   2/2") for line in shown)


def test_failed_step_stops_the_superlink_and_its_children(tmp_path):
    settings = resolve(overrides=SMALL)
    deployment = LocalDeployment(
        settings, out_dir=tmp_path / "run", workdir=tmp_path / "work", echo=lambda s: None
    )
    with pytest.raises(ConfigError, match="no key pair named"), deployment:
        deployment.start_superlink()
        deadline = time.monotonic() + 30
        while len(processes_of(deployment.flwr_home)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # the SuperLink starts flower-superexec
        seen = processes_of(deployment.flwr_home)
        assert len(seen) >= 2, seen
        deployment.start_supernode(0, key_name="nobody")
    assert processes_of(deployment.flwr_home) == []
    assert deployment.failed and (tmp_path / "work" / "logs" / "superlink.log").exists()


def test_ctrl_c_during_the_run_stops_every_process(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fedcore.cli", "deploy-local", "--sites", "2", "--rounds", "50",
            "--set", "local_epochs=1", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        argv, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"}
    )
    lines: list[str] = []
    workdir = None
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if m := re.search(r"working folder (\S+)", line):
                workdir = Path(m.group(1))
            if "Successfully installed fedcore" in line:  # the ServerApp process has started
                break
        assert workdir is not None, "".join(lines)
        flwr_home = workdir / "flwr-home"
        deadline = time.monotonic() + 60  # the SuperLink's SuperExec starts the ServerApp
        while not any("flwr-serverapp" in c for _, c in processes_of(flwr_home)):
            assert time.monotonic() < deadline, processes_of(flwr_home)
            time.sleep(0.2)
        time.sleep(1)  # a moment into the run, while the sites train
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
        lines.append(rest)
        assert proc.returncode == 130, "".join(lines)
        assert processes_of(flwr_home) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if workdir is not None:  # kept by deploy-local after an interruption, for its logs
            shutil.rmtree(workdir, ignore_errors=True)
