"""`pip install .` (not editable) into a fresh virtual environment, then `fedcore simulate` from a
folder outside the checkout: the installed fedcore finds its Flower app without the checkout."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_installed_package_simulates_from_any_folder(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The dependencies (torch, Flower, ...) come from this environment, read-only, through a .pth
    # file appended after the new environment's own site-packages; fedcore itself is installed.
    Path(purelib, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    build = tmp_path / "build"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FEDCORE_APP_DIR")}
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-build-isolation", "-q", str(ROOT)],
        check=True, cwd=build.mkdir() or build, env=env,
    )  # fmt: skip
    installed = Path(purelib) / "fedcore"
    assert (installed / "_app" / "server" / "app.py").is_file()
    assert not (Path(purelib) / "server").exists() and not (Path(purelib) / "clients").exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [str(venv / "bin" / "fedcore"), "simulate", "--set", "sites=2", "--set", "rounds=2",
         "--set", "local_epochs=1", "--out", "run"],
        cwd=elsewhere, env={**env, "FLWR_TELEMETRY_ENABLED": "0"}, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (elsewhere / "run" / "model.pt").exists()
    config = (elsewhere / "run" / "config.json").read_text()
    assert '"fedcore_commit": null' in config  # installed, not a checkout
