"""The settings ``fedcore deploy-local`` runs with (issues 22 and 25), checked without a federation.

A deployed run with site-level DP keeps its federation ledger in ``dp.server.state_dir``.
deploy-local owns its record folder, so a new run that names none gets ``OUT/federation``, and a
``--resume`` finds it in the record's ``config.json``; a record made without one (a simulation's)
cannot be resumed on the deployment engine, and that is refused before any process starts. The
deployment itself (``fedcore.deploy.local.deploy_local``, which starts the processes) is replaced
here by a stand-in that keeps the settings it was given.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedcore import config as cfg
from fedcore.cli import main
from fedcore.cli.deploy_local import STATE_FOLDER, deployed_settings
from fedcore.errors import ConfigError
from fedcore.federation.server.checkpoint import Checkpoint, write_checkpoint
from fedcore.runrecord import RecordWriter

# The command of issue 22, as its user typed it (plus --out).
ISSUE = ["deploy-local", "--sites", "3", "--rounds", "2"]
ISSUE += ["--set", "secagg.enabled=true", "--set", "dp.distributed.epsilon=4"]


class Started(Exception):
    """Raised by the stand-in where the deployment would start its first process."""


@pytest.fixture
def deployments(monkeypatch):
    """The settings each deployment would have started with; no process starts."""
    import fedcore.deploy.local

    started: list[cfg.Settings] = []

    def stand_in(settings, *, out_dir, echo, verbose):
        started.append(settings)
        raise Started(out_dir)

    monkeypatch.setattr(fedcore.deploy.local, "deploy_local", stand_in)
    return started


def resumable(out: Path, settings: cfg.Settings) -> Path:
    """A record of ``settings`` that stopped after round 1 (its config.json and checkpoint)."""
    RecordWriter(out, settings)
    checkpoint = Checkpoint(
        round=1, arrays={}, history=[], initial_loss=math.nan, initial_accuracy=math.nan
    )
    write_checkpoint(out, checkpoint)
    return out


def test_the_issues_command_runs_with_a_state_dir_inside_its_record(tmp_path, deployments, capsys):
    out = tmp_path / "run"
    with pytest.raises(Started):
        main([*ISSUE, "--out", str(out)])
    (settings,) = deployments
    assert settings.dp.server.state_dir == str(out / STATE_FOLDER)
    assert (settings.sites, settings.rounds, settings.secagg.enabled) == (3, 2, True)
    assert settings.dp.distributed.epsilon == 4.0
    err = capsys.readouterr().err
    assert f"federation ledger in dp.server.state_dir {out / STATE_FOLDER} (inside the run" in err


def test_a_state_dir_that_is_given_is_kept(tmp_path):
    given = cfg.resolve(overrides=["dp.server.epsilon=2", f"dp.server.state_dir={tmp_path}/led"])
    assert deployed_settings(given, tmp_path / "run") is given
    plain = cfg.resolve(overrides=["dp.site.epsilon=2"])  # record-level DP only: no ledger here
    assert deployed_settings(plain, tmp_path / "run") is plain


def test_a_resume_finds_the_state_dir_again(tmp_path, deployments):
    out = tmp_path / "run"
    first = deployed_settings(cfg.resolve(overrides=["sites=3", "dp.server.epsilon=4"]), out)
    resumable(out, first)
    with pytest.raises(Started):
        main(["deploy-local", "--sites", "3", "--resume", str(out)])
    (settings,) = deployments
    assert settings.resume and settings.dp.server.state_dir == str(out / STATE_FOLDER)


def test_a_record_without_a_state_dir_is_refused_before_any_process_starts(
    tmp_path, deployments, capsys
):
    out = resumable(tmp_path / "run", cfg.resolve(overrides=["sites=3", "dp.server.epsilon=4"]))
    assert main(["deploy-local", "--sites", "3", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs 'dp.server.state_dir'" in err and "made without one" in err
    assert deployments == []  # refused before the deployment started
    assert not (out / "status.json").exists()  # the record is left as it was
    with pytest.raises(ConfigError, match="a resume cannot change"):
        deployed_settings(cfg.resolve(values={"dp.server.epsilon": 4.0, "resume": True}), out)
