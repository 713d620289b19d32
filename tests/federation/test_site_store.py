"""SiteStore: the one place a site's persistent files are named and written."""

from __future__ import annotations

import os
import threading

import pytest

from fedcore._files import atomic_write, check_private, create_exclusive, read_private
from fedcore.errors import ConfigError
from fedcore.federation.site.store import SiteStore


def test_atomic_write_is_private_and_replaces(tmp_path):
    path = tmp_path / "f"
    atomic_write(path, b"one")
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert read_private(path) == b"two"


def test_create_exclusive_has_one_winner(tmp_path):
    path = tmp_path / "k"
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(create_exclusive(path, bytes([i]) * 4))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    assert len(path.read_bytes()) == 4
    assert not [p for p in tmp_path.iterdir() if p.name != "k"]  # no temporary left behind


def test_read_private_refuses_a_world_readable_file(tmp_path):
    path = tmp_path / "k"
    path.write_bytes(b"x")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="mode 0644"):
        read_private(path)


def test_read_private_refuses_a_symlink_even_to_a_private_file(tmp_path):
    target = tmp_path / "real"
    atomic_write(target, b"secret")
    link = tmp_path / "k"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        check_private(link)


def test_store_names_each_file_once_and_knows_past_releases(tmp_path):
    store = SiteStore(tmp_path / "s", 3)
    assert not store.has_released()
    store.ensure()
    assert create_exclusive(store.key_path, b"k" * 32)
    assert store.has_released()
    names = {store.key_path.name, store.journal_path.name, store.ledger_path.name, store.certificate_path.name}
    assert len(names) == 4 and all("site-3." in n for n in names)


def test_a_key_and_an_empty_journal_released_nothing_a_round_did(tmp_path):
    """What ``fedcore certs --show-signing-key`` leaves (a key, a journal with its header only) is
    a site that released nothing: its first ledger is new, not lost (issue 23's hosts test found
    every round refused); one round in the journal, or a key whose journal is gone, is a release."""
    from fedcore.federation.site.journal import RoundJournal

    store = SiteStore(tmp_path / "s", 4)
    RoundJournal.open_site(store)  # journal (header only), then key
    assert store.key_path.exists() and store.journal_path.exists()
    assert not store.has_released()
    RoundJournal(store).begin(bytes(16), run_id="run")
    assert store.has_released()
    store.journal_path.unlink()
    assert store.has_released()  # the key without its journal: the journal was lost


def test_lock_serialises_read_modify_write(tmp_path):
    store = SiteStore(tmp_path, 1).ensure()
    counter = tmp_path / "n"
    atomic_write(counter, b"0")

    def bump():
        for _ in range(25):
            with store.lock("ledger"):
                value = int(counter.read_bytes())
                atomic_write(counter, str(value + 1).encode())

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert int(counter.read_bytes()) == 100
