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
