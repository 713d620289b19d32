"""``--help`` is plain text that shows what is required (issue 25 point 6)."""

from __future__ import annotations

import pytest

from fedcore.cli import description_of, main

COMMANDS = [
    ["simulate"],
    ["deploy-local"],
    ["experiment"],
    ["certs"],
    ["ledger"],
    ["ledger", "reset"],
    ["budget"],
    ["audit"],
]


def _help(command: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--help"])
    assert stopped.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_has_no_literal_markup(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(command, capsys)
    assert "`" not in text, text


@pytest.mark.parametrize(
    ("command", "required"),
    [
        (["ledger", "reset"], "--state-dir DIR (--site N | --federation) --reason TEXT"),
        (["budget"], "--sample-rate Q --steps T --delta D"),
        (["deploy-local"], "--sites N"),
    ],
)
def test_usage_shows_required_options_as_required(
    command: list[str], required: str, capsys: pytest.CaptureFixture[str]
) -> None:
    usage = _help(command, capsys).split("\n\n")[0]
    assert required in usage
    for option in required.replace("(", "").split():
        if option.startswith("--"):
            assert f"[{option}" not in usage, usage


def test_description_of_drops_markup() -> None:
    doc = "``fedcore x``: uses :mod:`fedcore.y` and :class:`~fedcore.z.Z`, `Title`.\n\nMore."
    assert description_of(doc) == "fedcore x: uses fedcore.y and fedcore.z.Z, Title."


def test_audit_help_names_the_folder_an_audit_without_out_writes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import datetime as dt
    from pathlib import Path

    from fedcore.cli.audit import DEFAULT_OUT, default_out

    text = " ".join(_help(["audit"], capsys).split())
    assert f"folder for audit.json (default: {DEFAULT_OUT})" in text
    folder = default_out(dt.datetime(2026, 1, 2, 3, 4, 5))
    assert folder == Path("runs") / "audit-20260102-030405"
    assert str(folder.parent) + "/audit-<timestamp>" == DEFAULT_OUT


def test_one_of_a_thing_is_not_plural(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["budget", "--sample-rate", "0.01", "--steps", "1", "--delta", "1e-5"]
    assert main([*argv, "--noise-multiplier", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 step," in out and "1 steps" not in out
    assert main([*argv[:4], "2", *argv[5:], "--noise-multiplier", "1"]) == 0
    assert "2 steps," in capsys.readouterr().out


def test_the_seed_help_says_dp_runs_differ_at_a_fixed_seed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """DP noise and Poisson batches come from the CSPRNG by design (issue 25 point 4)."""
    from fedcore.experiment.results import CSPRNG_NOTE

    assert CSPRNG_NOTE in " ".join(_help(["simulate"], capsys).split())
    assert main(["simulate", "--help-settings"]) == 0
    (seed,) = [
        line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["seed"]
    ]
    assert CSPRNG_NOTE in seed
