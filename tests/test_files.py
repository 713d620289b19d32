"""fedcore._files: the one helper every writer uses (atomic, durable, private, strict JSON)."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest

from fedcore import _files
from fedcore._files import (
    PUBLIC_MODE,
    atomic_write,
    atomic_write_through,
    finite_or_null,
    json_bytes,
    read_private,
)


def _synced_dirs(monkeypatch) -> list[str]:
    """Record every folder whose descriptor is fsynced."""
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced


def test_an_atomic_write_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    synced = _synced_dirs(monkeypatch)
    atomic_write(tmp_path / "a.json", b"{}")
    assert synced == [str(tmp_path)]


def test_the_run_record_writes_through_the_durable_helper(tmp_path, monkeypatch):
    """runrecord's own atomic_write renamed without syncing the folder: a power cut could lose the
    rename. Its writers now go through fedcore._files."""
    from fedcore.runrecord import RecordWriter

    record = RecordWriter.__new__(RecordWriter)
    record.path = tmp_path
    synced = _synced_dirs(monkeypatch)
    record.write_json("status.json", {"status": "completed"})
    assert synced == [str(tmp_path)]
    assert stat.S_IMODE((tmp_path / "status.json").stat().st_mode) == PUBLIC_MODE


def test_privacy_json_is_strict_json_with_nan_and_infinity_as_null(tmp_path):
    """``privacy.json`` held bare ``NaN`` (a round that released nothing), which is not JSON."""
    from fedcore.runrecord import RecordWriter

    record = RecordWriter.__new__(RecordWriter)
    record.path = tmp_path
    doc = {"rounds": [{"server_epsilon": math.nan}, {"x": (1.5, math.inf)}], "e": -math.inf}
    record.write_json("privacy.json", doc)
    text = (tmp_path / "privacy.json").read_text()
    assert "NaN" not in text and "Infinity" not in text

    def refuse(name: str) -> float:
        raise ValueError(name)

    parsed = json.loads(text, parse_constant=refuse)  # a strict reader
    assert parsed == {"rounds": [{"server_epsilon": None}, {"x": [1.5, None]}], "e": None}


def test_finite_values_pass_through_unchanged():
    doc = {"a": 1, "b": [0.25, "x", None, True], "c": {"d": 2.0}}
    assert finite_or_null(doc) == doc
    assert json.loads(json_bytes(doc)) == doc


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "model.pt"
    atomic_write(path, b"old")

    def broken(handle) -> None:
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_through(path, broken, mode=PUBLIC_MODE)
    assert read_private(path) == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_the_mode_is_exact_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "public", b"x", mode=PUBLIC_MODE)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "public").stat().st_mode) == 0o644
    atomic_write(tmp_path / "secret", b"x")
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600


def test_the_helper_imports_nothing_above_it():
    source = Path(_files.__file__).read_text()
    imports = [line for line in source.splitlines() if line.startswith("from fedcore")]
    assert imports == ["from fedcore.errors import ConfigError"]
