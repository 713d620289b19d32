"""A Flower app whose ``[tool.flwr.app.config]`` lacks a fedcore setting fails fast (issue 25).

Flower refuses a run config key the app does not declare ("Key 'proximal_mu' is not present in
the main dictionary"). In the simulation it did so only as the ClientApps started, after the
ServerApp had opened the record, and the ServerApp thread then waited for replies until every
round timed out: 20 rounds of 600 s with the defaults. Now the command refuses such an app before
anything starts (exit 2, one line naming the key), and an engine that fails under the ServerApp
anyway ends the run at once (exit 1).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedcore import config as cfg
from fedcore.cli import main
from fedcore.cli.preflight import app_declares_settings
from fedcore.errors import ConfigError
from tests.deploy.conftest import processes_with

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["sites=2", "rounds=2", "dataset=synthetic", "synthetic.samples=300", "local_epochs=1"]


def app_without(tmp_path: Path, *patterns: str) -> Path:
    """A copy of the checkout's Flower app whose pyproject lacks the lines matching ``patterns``."""
    app = tmp_path / "app"
    app.mkdir()
    for part in ("server", "clients"):
        shutil.copytree(ROOT / part, app / part, ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "pyproject.toml").read_text()
    for pattern in patterns:
        text, found = re.subn(pattern, "", text, flags=re.MULTILINE)
        assert found == 1, pattern
    (app / "pyproject.toml").write_text(text)
    return app


def test_the_checkouts_app_declares_every_setting():
    app_declares_settings(cfg.Settings(), app_dir=ROOT)  # raises otherwise


def test_a_missing_key_is_named_with_the_file(tmp_path):
    app = app_without(tmp_path, r"^proximal_mu = .*\n")
    with pytest.raises(
        ConfigError, match=r"does not declare 1 fedcore setting\(s\).*'proximal_mu'"
    ):
        app_declares_settings(cfg.Settings(), app_dir=app)


def test_a_key_of_a_nested_table_is_named_dotted(tmp_path):
    # [tool.flwr.app.config.dp.site] epsilon: Flower flattens it to dp.site.epsilon
    app = app_without(
        tmp_path, r'^epsilon = ""\n(?=delta = 1e-05\nnoise_multiplier = ""\nmax_grad)'
    )
    with pytest.raises(ConfigError, match=r"\('dp\.site\.epsilon'\)"):
        app_declares_settings(cfg.Settings(), app_dir=app)


def test_an_unreadable_pyproject_is_a_config_error(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.flwr\n")
    with pytest.raises(ConfigError, match="cannot read the Flower app's"):
        app_declares_settings(cfg.Settings(), app_dir=tmp_path)


def test_simulate_refuses_the_app_before_anything_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDCORE_APP_DIR", str(app_without(tmp_path, r"^proximal_mu = .*\n")))
    start = time.monotonic()
    code = main(
        ["simulate", *(a for s in SMALL for a in ("--set", s)), "--out", str(tmp_path / "r")]
    )
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert seconds < 60, seconds
    assert "does not declare 1 fedcore setting(s)" in err and "'proximal_mu'" in err
    assert not (tmp_path / "r").exists()  # no record, not even an empty folder


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="needs /proc")
def test_an_engine_that_fails_under_the_server_app_ends_the_run(tmp_path, monkeypatch):
    """The same app, started past the check (as `fedcore simulate` starts its child): the engine
    raises in the child while the ServerApp thread waits for replies; the child exits at once
    instead of after rounds x round_timeout (here 2 x 600 s), and the command says it failed."""
    from fedcore.cli.simulate import HANDSHAKE_PREFIX, start_child, supervise
    from fedcore.deploy.processes import ProcessSupervisor
    from fedcore.federation.simulation.engine import GO, HANDSHAKE_ENV

    monkeypatch.setenv("FEDCORE_APP_DIR", str(app_without(tmp_path, r"^proximal_mu = .*\n")))
    settings = cfg.resolve(overrides=[*SMALL, "round_timeout=600"])
    out = tmp_path / "run"
    handshake = Path(tempfile.mkdtemp(prefix=f"{HANDSHAKE_PREFIX}{os.getpid()}-"))
    supervisor = ProcessSupervisor(grace=3.0, mark=(HANDSHAKE_ENV, str(handshake)))
    try:
        child = start_child(supervisor, settings, out_dir=out, verbose=False, handshake=handshake)
        out.mkdir()
        start = time.monotonic()
        (handshake / GO).touch()
        code = supervise(supervisor, child, settings, out_dir=out, handshake=handshake)
        seconds = time.monotonic() - start
    finally:
        supervisor.stop_all()
        shutil.rmtree(handshake, ignore_errors=True)
    print(f"the run ended {seconds:.1f} s after its go, exit {code}")
    assert code == 1
    assert seconds < 90, seconds  # imports, Ray's start and the failure; a hang: 1200 s
    assert processes_with(HANDSHAKE_ENV, str(handshake)) == []
