"""`fedcore budget`: epsilon for a noise multiplier, noise for a target epsilon, JSON, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedcore.cli import main
from fedcore.privacy.accountant import epsilon
from fedcore.privacy.events import PoissonSubsampledGaussian

BASE = ["budget", "--sample-rate", "0.05", "--steps", "200", "--delta", "1e-5"]


def run_json(capsys, *extra: str) -> dict:
    assert main([*BASE, *extra, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return json.loads(out[0])


def test_prints_epsilon(capsys):
    assert main([*BASE, "--noise-multiplier", "1.2"]) == 0
    out = capsys.readouterr().out
    event = PoissonSubsampledGaussian(sampling_rate=0.05, noise_multiplier=1.2, count=200)
    assert f"epsilon {epsilon(event, delta=1e-5):.6g}" in out


def test_json_has_exactly_the_three_keys(capsys):
    doc = run_json(capsys, "--noise-multiplier", "1.2", "--accountant", "rdp")
    assert set(doc) == {"epsilon", "noise_multiplier", "accountant"}
    assert doc["accountant"] == "rdp" and doc["noise_multiplier"] == 1.2
    event = PoissonSubsampledGaussian(sampling_rate=0.05, noise_multiplier=1.2, count=200)
    assert doc["epsilon"] == epsilon(event, delta=1e-5, accountant="rdp")


def test_target_epsilon_prints_the_smallest_noise_that_meets_it(capsys):
    doc = run_json(capsys, "--target-epsilon", "3", "--accountant", "rdp")
    assert doc["epsilon"] <= 3.0
    lower = PoissonSubsampledGaussian(
        sampling_rate=0.05, noise_multiplier=doc["noise_multiplier"] / 1.001, count=200
    )
    assert epsilon(lower, delta=1e-5, accountant="rdp") > 3.0
    assert main([*BASE, "--target-epsilon", "3", "--accountant", "rdp"]) == 0
    assert capsys.readouterr().out.startswith("noise multiplier ")


@pytest.mark.parametrize(
    "argv",
    [
        [*BASE, "--noise-multiplier", "0"],
        [*BASE, "--noise-multiplier", "abc"],
        [*BASE, "--noise-multiplier", "nan"],
        [*BASE, "--noise-multiplier", "1", "--target-epsilon", "2"],
        [*BASE],
        [*BASE, "--target-epsilon", "-1"],
        [*BASE, "--noise-multiplier", "1", "--accountant", "prv"],
        [
            "budget",
            "--sample-rate",
            "1.5",
            "--steps",
            "10",
            "--delta",
            "1e-5",
            "--noise-multiplier",
            "1",
        ],
        [
            "budget",
            "--sample-rate",
            "0.1",
            "--steps",
            "2.5",
            "--delta",
            "1e-5",
            "--noise-multiplier",
            "1",
        ],
        [
            "budget",
            "--sample-rate",
            "0.1",
            "--steps",
            "10",
            "--delta",
            "1",
            "--noise-multiplier",
            "1",
        ],
        ["budget", "--sample-rate", "0.1", "--delta", "1e-5", "--noise-multiplier", "1"],
    ],
)
def test_bad_values_are_one_line_and_exit_2(capsys, argv):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedcore budget: error: ")


def test_console_entry_point():
    cmd = [
        sys.executable,
        "-c",
        "from fedcore.cli import main; raise SystemExit(main())",
        *BASE,
        "--noise-multiplier",
        "2",
        "--json",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) == {"epsilon", "noise_multiplier", "accountant"}
