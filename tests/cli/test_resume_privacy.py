"""A run with record-level DP killed after its sites released a round, then resumed (issue 12,
point 2): the resumed round is re-sent by the sites, not retrained, so every site's ledger holds
one charge per round it released. A real ``fedcore simulate`` child, and a real ``fedcore
deploy-local`` with all its processes, killed with SIGKILL."""

import io
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

from fedcore.deploy.processes import ProcessId
from fedcore.federation.server.checkpoint import read_checkpoint
from fedcore.federation.site.store import SiteStore
from tests.cli.test_lifecycle import rows, start, tree
from tests.deploy.conftest import end_deploy_local, processes_of

SITES, ROUNDS = 2, 6
COMMON = [  # what deploy-local takes besides --sites and --rounds
    *("--set", "local_epochs=1", "--set", "seed=3"),
    *("--set", "dataset=synthetic", "--set", "synthetic.samples=600"),
    *("--set", "dp.site.epsilon=50", "--set", "dp.site.noise_multiplier=1.0"),
]
SETTINGS = ["--set", f"sites={SITES}", "--set", f"rounds={ROUNDS}", *COMMON]


def released_round(store, run_id):
    """The round of the release a site keeps for ``run_id`` (0: none yet, or being replaced)."""
    try:
        doc = torch.load(io.BytesIO(store.release_path(run_id).read_bytes()), weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return 0
    return int(doc["round"])


def charged_rounds(store):
    return [e["round"] for e in json.loads(store.ledger_path.read_text())["entries"]]


def kill_between_release_and_checkpoint(process, out, stores, run_id, *, victims, deadline, why):
    """Wait until every site has released round k while the server has not completed it; freeze
    every process of the run there (SIGSTOP; ``victims()`` names them), and kill them all if the
    checkpoint is still at k - 1. If the server got further between the look and the freeze, let
    it go on and try the next round. Returns k."""
    while True:
        assert process.poll() is None and time.monotonic() < deadline, why()
        k = len(rows(out)) + 1
        assert k < ROUNDS, "the run ended before a round could be caught between release and end"
        if not all(released_round(s, run_id) == k for s in stores):
            time.sleep(0.01)
            continue
        frozen = victims()
        for victim in frozen:
            victim.signal(signal.SIGSTOP)
        checkpoint = read_checkpoint(out)
        if checkpoint is not None and checkpoint.round == k - 1:
            for victim in frozen:
                victim.signal(signal.SIGKILL)
            return k
        for victim in frozen:
            victim.signal(signal.SIGCONT)


@pytest.mark.slow
def test_sigkill_after_sites_released_a_round_then_resume_charges_each_round_once(tmp_path):
    out = tmp_path / "run"
    process = start("simulate", *SETTINGS, "--out", str(out))
    deadline = time.monotonic() + 240
    while not (out / "config.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    run_id = json.loads((out / "config.json").read_text())["fedcore_run_id"]
    stores = [SiteStore(out / "sites", s) for s in range(SITES)]

    killed_at = kill_between_release_and_checkpoint(
        process, out, stores, run_id,
        victims=lambda: {ProcessId.of(process.pid), *tree(process.pid)},
        deadline=deadline, why=process.communicate,
    )  # fmt: skip
    process.wait(timeout=30)
    assert not (out / "status.json").exists()
    for store in stores:  # round k was released and charged once before the kill
        assert charged_rounds(store) == list(range(1, killed_at + 1))

    resumed = start("simulate", "--resume", str(out))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert [r["round"] for r in rows(out)] == list(range(1, ROUNDS + 1))
    for store in stores:  # the resumed round k was re-sent, not charged again
        assert charged_rounds(store) == list(range(1, ROUNDS + 1))
    assert json.loads((out / "status.json").read_text())["status"] == "completed"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="needs /proc")
def test_deploy_local_killed_after_sites_released_a_round_then_resume_charges_each_round_once(
    tmp_path,
):
    # The same attack through the deployment engine: the sites are SuperNodes whose ClientApps
    # keep their ledgers and releases under the record (state-dir OUT/sites), and the kill takes
    # deploy-local, its SuperLink, SuperNodes, ServerApp and ClientApps all at once.
    out = tmp_path / "run"
    err = tmp_path / "deploy-local.err"
    base = [sys.executable, "-m", "fedcore.cli", "deploy-local", "--sites", str(SITES)]
    env = {**os.environ, "COLUMNS": "200", "FLWR_TELEMETRY_ENABLED": "0"}
    with err.open("w") as sink:
        process = subprocess.Popen(
            [*base, "--rounds", str(ROUNDS), *COMMON, "--out", str(out)],
            stdout=subprocess.DEVNULL, stderr=sink, env=env,
        )  # fmt: skip
    workdirs: list[Path] = []
    try:
        deadline = time.monotonic() + 300
        while not (out / "config.json").exists() or not workdirs:
            assert process.poll() is None and time.monotonic() < deadline, err.read_text()
            workdirs = [Path(p) for p in re.findall(r"working folder (\S+)", err.read_text())]
            time.sleep(0.05)
        flwr_home = workdirs[0] / "flwr-home"
        run_id = json.loads((out / "config.json").read_text())["fedcore_run_id"]
        stores = [SiteStore(out / "sites", s) for s in range(SITES)]

        killed_at = kill_between_release_and_checkpoint(
            process, out, stores, run_id,
            victims=lambda: {ProcessId.of(process.pid)}
            | {ProcessId.of(pid) for pid, _ in processes_of(flwr_home)},
            deadline=deadline, why=err.read_text,
        )  # fmt: skip
        process.wait(timeout=30)
        for _ in range(150):  # whatever started in the instant before the freeze follows its parent
            if not processes_of(flwr_home):
                break
            time.sleep(0.2)
        assert processes_of(flwr_home) == []
        assert not (out / "status.json").exists()
        for store in stores:  # round k was released and charged once before the kill
            assert charged_rounds(store) == list(range(1, killed_at + 1))

        resumed = subprocess.run(
            [*base, "--resume", str(out)], capture_output=True, text=True, env=env, timeout=600
        )
        workdirs += [Path(p) for p in re.findall(r"working folder (\S+)", resumed.stderr)]
        assert resumed.returncode == 0, resumed.stderr
        assert [r["round"] for r in rows(out)] == list(range(1, ROUNDS + 1))
        for store in stores:  # the resumed round k was re-sent by every site, not charged again
            assert charged_rounds(store) == list(range(1, ROUNDS + 1))
        assert json.loads((out / "status.json").read_text())["status"] == "completed"
    finally:
        end_deploy_local(process, workdirs)
