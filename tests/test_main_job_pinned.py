"""The main job (`fedcore simulate` with the defaults) is bit for bit what it was before the
redesign of the protections (issue 19): the model's bytes and every field of its history but the
wall-clock ones. The digests were computed on commit 39188c1 (before the redesign) with the command
in this test; a change that moves them changes what the main job computes, and must say why."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL_SHA256 = "a5f509c74999a6dd32da22c41bc4f9767bea7610490da8083a60da29cb7f6ee7"
HISTORY_SHA256 = "680e56242a33904eb6c6cce45bfa636ae8d7811c11985154f1d1cf4533f5b54a"
WALL_CLOCK = ("seconds", "ended_at")


def model_digest(path: Path) -> str:
    state = torch.load(path, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].numpy().tobytes())
    return digest.hexdigest()


def history_digest(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in rows]
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


@pytest.mark.slow
def test_the_main_job_is_bit_for_bit_the_same(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "fedcore.cli", "simulate", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert history_digest(out / "history.jsonl") == HISTORY_SHA256
    assert model_digest(out / "model.pt") == MODEL_SHA256
