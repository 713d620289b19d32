"""One store per site: every file a site keeps across rounds, runs and restarts, under one object.

A site's secure-aggregation key, its round journal, its record-level privacy ledger and its
registry material all live in one folder on the site's own disk (the node config's ``state-dir``;
in simulation, where every site shares this machine, ``<run record>/sites``). :class:`SiteStore`
names each file once; every file in it is written and read through :mod:`fedcore._files`:

- :func:`~fedcore._files.atomic_write`: a reader sees the old file or the new one, never a mix
  (temporary file, fsync, rename, fsync of the folder), created with mode 0600;
- :func:`~fedcore._files.create_exclusive`: written once, never replaced, mode 0600.

Secret files are read only through :func:`~fedcore._files.read_private`, which refuses a file that
is a symbolic link, is not owned by this user, or can be read or written by anyone else: a key
planted by another user, or a link to a file an attacker controls, is refused with a
:class:`ConfigError` rather than used silently.

:meth:`SiteStore.lock` is an OS advisory lock (:func:`~fedcore._files.lock_file`) on a lock file
beside the data, held while a file is read, checked and rewritten, so two processes of one site
never interleave a read-modify-write (a lost privacy charge, a journal entry written twice).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fedcore._files import lock_file
from fedcore.errors import ConfigError


@dataclass(frozen=True, slots=True)
class SiteStore:
    """The folder ``root`` that holds site ``site_id``'s persistent state, and the name of each file.

    Creating the object touches nothing; :meth:`ensure` creates the folder (mode 0700 when new).
    """

    root: Path
    site_id: int

    @property
    def key_path(self) -> Path:
        """The site's secure-aggregation key (32 random bytes, mode 0600, created once)."""
        return self.root / f"site-{self.site_id}.secagg.key"

    @property
    def journal_path(self) -> Path:
        """The site's secure-aggregation round journal (one entry per round id it took part in)."""
        return self.root / f"site-{self.site_id}.secagg.journal"

    # Every site's ledger in one folder (the simulation's server reads them for privacy.json).
    LEDGER_GLOB: ClassVar[str] = "site-*.ledger.json"

    @property
    def ledger_path(self) -> Path:
        """The site's record-level privacy ledger (one of :attr:`LEDGER_GLOB`)."""
        return self.root / f"site-{self.site_id}.ledger.json"

    @property
    def distributed_ledger_path(self) -> Path:
        """The site's distributed-DP ledger: what it spent against the server, as a whole site
        (:mod:`fedcore.mechanisms.distributed`); named outside :attr:`LEDGER_GLOB`."""
        return self.root / f"site-{self.site_id}.distributed-ledger.json"

    @property
    def certificate_path(self) -> Path:
        """The site's secure-aggregation certificate (active mode), issued by the federation CA."""
        return self.root / f"site-{self.site_id}.secagg.cert.pem"

    def release_path(self, run_id: str) -> Path:
        """The last update the site released in fedcore run ``run_id`` under record-level DP
        (:mod:`fedcore.federation.site.release`). ``run_id`` must be a checked run id (hex)."""
        return self.root / f"site-{self.site_id}.release.{run_id}.pt"

    def release_paths(self) -> list[Path]:
        """Every release file of this site, one per run."""
        return sorted(self.root.glob(f"site-{self.site_id}.release.*.pt"))

    def lock_path(self, name: str) -> Path:
        return self.root / f".site-{self.site_id}.{name}.lock"

    def ensure(self) -> SiteStore:
        """Create the folder if needed (0700); returns self. Raises ConfigError if it cannot."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the site state folder {str(self.root)!r}: {exc}"
            ) from None
        if not self.root.is_dir():
            raise ConfigError(f"site state folder {str(self.root)!r} is not a folder")
        return self

    def has_released(self) -> bool:
        """Whether this site has ever taken part in anything that released data: its round
        journal holds a round (a line after its header), or its key exists without a journal
        (the journal is made first, so it was lost). A key and a journal with no round yet, as
        ``fedcore certs --show-signing-key`` leaves them, released nothing. A ledger missing
        beside a released site has been lost, not never made."""
        try:
            with open(self.journal_path, "rb") as journal:
                head = journal.read(4096)
        except FileNotFoundError:
            return self.key_path.exists()
        except OSError:
            return True  # a journal that cannot be read: assume the worst
        first = head.find(b"\n")
        return first < 0 or first + 1 < len(head)

    @property
    def ledger_seal_path(self) -> Path:
        """The seal beside the ledger: how many charges it held when last written (issue 11)."""
        return self.root / f"site-{self.site_id}.ledger.seal"

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold an exclusive OS lock named ``name`` for this site (waits for another holder)."""
        self.ensure()
        with lock_file(self.lock_path(name)):
            yield
