"""`fedcore deploy-local` stopped by a signal mid-run closes its record, leaves no process, and
`--resume` runs it to the end with every round once; killed outright (SIGKILL), it leaves no
deployment running on behind it, and `--resume` still runs it to the end."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.deploy.conftest import end_deploy_local, processes_of

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="needs /proc")]


def _rows(out: Path) -> list[dict]:
    path = out / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_until(
    proc: subprocess.Popen, pattern: str, lines: list[str], workdirs: list[Path]
) -> None:
    """Read ``proc``'s stderr into ``lines`` until a line matches ``pattern``, noting every
    deployment working folder it names (the test removes them)."""
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if m := re.search(r"working folder (\S+)", line):
            workdirs.append(Path(m.group(1)))
        if re.search(pattern, line):
            return


def test_sigterm_mid_run_closes_the_record_and_resume_finishes_it(tmp_path):
    out = tmp_path / "run"
    base = [sys.executable, "-m", "fedcore.cli", "deploy-local", "--sites", "2"]
    argv = [*base, "--rounds", "6", "--set", "local_epochs=1", "--out", str(out)]
    env = {**os.environ, "COLUMNS": "200", "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    workdirs: list[Path] = []
    lines: list[str] = []
    try:
        _read_until(proc, r"round\s+1/6", lines, workdirs)
        assert workdirs, "".join(lines)
        flwr_home = workdirs[0] / "flwr-home"
        assert any("flwr-serverapp" in cmd for _, cmd in processes_of(flwr_home))
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=120)
        lines.append(rest)
        assert proc.returncode == 143, "".join(lines)
        assert processes_of(flwr_home) == []
        status = json.loads((out / "status.json").read_text())
        done = status["rounds_completed"]
        assert status["status"] == "interrupted" and 1 <= done < 5, status
        assert f"interrupted after round {done}" in (out / "summary.md").read_text()
        assert [r["round"] for r in _rows(out)] == list(range(1, done + 1))
        checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
        model = torch.load(out / "model.pt")
        assert all(torch.equal(model[k], checkpoint["arrays"][k]) for k in model)

        # The resumed run killed outright after one more round: the kernel takes its SuperLink,
        # SuperNodes and `flwr run` with it (PR_SET_PDEATHSIG), and fedcore's reaper their
        # children (fedcore/deploy/reaper.py).
        proc = subprocess.Popen(
            [*base, "--resume", str(out)], stderr=subprocess.PIPE, text=True, env=env
        )
        _read_until(proc, rf"round\s+{done + 1}/6", lines, workdirs)
        proc.kill()
        proc.wait()
        killed_home = workdirs[-1] / "flwr-home"
        deadline = time.monotonic() + 30
        while processes_of(killed_home) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = processes_of(killed_home)
        assert left == [], f"{left}\n" + "".join(lines)

        resumed = subprocess.run(
            [*base, "--resume", str(out)], capture_output=True, text=True, env=env, timeout=600
        )
        workdirs += [Path(p) for p in re.findall(r"working folder (\S+)", resumed.stderr)]
        assert resumed.returncode == 0, resumed.stderr
        assert [r["round"] for r in _rows(out)] == list(range(1, 7))
        assert json.loads((out / "status.json").read_text())["status"] == "completed"
    finally:
        end_deploy_local(proc, workdirs)
