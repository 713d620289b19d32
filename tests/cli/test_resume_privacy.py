"""A run with record-level DP killed after its sites released a round, then resumed (issue 12,
point 2): the resumed round is re-sent by the sites, not retrained, so every site's ledger holds
one charge per round it released. A real ``fedcore simulate`` child, killed with SIGKILL."""

import io
import json
import signal
import time

import pytest
import torch

from fedcore.deploy.processes import ProcessId
from fedcore.federation.checkpoint import read_checkpoint
from fedcore.federation.site_store import SiteStore
from tests.cli.test_lifecycle import rows, start, tree

SITES, ROUNDS = 2, 6
SETTINGS = [
    *("--set", f"sites={SITES}", "--set", f"rounds={ROUNDS}", "--set", "local_epochs=1"),
    *("--set", "seed=3", "--set", "dataset=synthetic", "--set", "synthetic.samples=600"),
    *("--set", "dp.site.epsilon=50", "--set", "dp.site.noise_multiplier=1.0"),
]


def released_round(store, run_id):
    """The round of the release a site keeps for ``run_id`` (0: none yet, or being replaced)."""
    try:
        doc = torch.load(io.BytesIO(store.release_path(run_id).read_bytes()), weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return 0
    return int(doc["round"])


def charged_rounds(store):
    return [e["round"] for e in json.loads(store.ledger_path.read_text())["entries"]]


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

    # Wait until every site has released round k while the server has not completed it; freeze
    # the whole run there (SIGSTOP), and kill it if the checkpoint is still at k - 1. If the
    # server got further between the look and the freeze, let it go on and try the next round.
    killed_at = None
    while killed_at is None:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        k = len(rows(out)) + 1
        assert k < ROUNDS, "the run ended before a round could be caught between release and end"
        if not all(released_round(s, run_id) == k for s in stores):
            time.sleep(0.01)
            continue
        victims = {ProcessId.of(process.pid), *tree(process.pid)}
        for victim in victims:
            victim.signal(signal.SIGSTOP)
        checkpoint = read_checkpoint(out)
        if checkpoint is not None and checkpoint.round == k - 1:
            for victim in victims:
                victim.signal(signal.SIGKILL)
            killed_at = k
        else:
            for victim in victims:
                victim.signal(signal.SIGCONT)
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
