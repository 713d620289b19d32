"""One store per site: every file a site keeps across rounds, runs and restarts, under one object.

A site's secure-aggregation key, its round journal, its record-level privacy ledger and its
registry material all live in one folder on the site's own disk (the node config's ``state-dir``;
in simulation, where every site shares this machine, ``<run record>/sites``). :class:`SiteStore`
names each file once and owns the two ways they are written:

- :func:`atomic_write`: a reader sees the old file or the new one, never a mix (temporary file,
  fsync, rename, fsync of the folder), created with mode 0600;
- :func:`create_exclusive`: written once, never replaced (``O_CREAT | O_EXCL``), mode 0600.

Secret files are read only through :func:`read_private`, which refuses a file that is a symbolic
link, is not owned by this user, or can be read or written by anyone else: a key planted by another
user, or a link to a file an attacker controls, is refused with a :class:`ConfigError` rather than
used silently.

:meth:`SiteStore.lock` is an OS advisory lock (``fcntl.flock``) on a lock file beside the data,
held while a file is read, checked and rewritten, so two processes of one site never interleave a
read-modify-write (a lost privacy charge, a journal entry written twice).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedcore.errors import ConfigError

PRIVATE_MODE = 0o600


def check_private(path: Path) -> None:
    """Raise :class:`ConfigError` unless ``path`` is a regular file (not a link), owned by this
    user, with no permission for group or others. Nothing is changed."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ConfigError(f"{str(path)!r} does not exist") from None
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(f"{str(path)!r} is a symbolic link; a site's secret files must be plain files")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{str(path)!r} is not a regular file")
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"{str(path)!r} is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
        )
    if info.st_mode & 0o077:
        raise ConfigError(
            f"{str(path)!r} has mode {stat.S_IMODE(info.st_mode):04o}; expected 0600 "
            "(readable and writable by its owner only)"
        )


def read_private(path: Path) -> bytes:
    """The bytes of a secret file, after :func:`check_private`. Raises :class:`ConfigError`."""
    check_private(path)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: Path, data: bytes, *, mode: int = PRIVATE_MODE) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp file, fsync, rename, fsync dir)."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def create_exclusive(path: Path, data: bytes, *, mode: int = PRIVATE_MODE) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True if this call created it.

    The file appears whole: it is written under a temporary name and linked into place, so a
    concurrent reader never sees it half-written, and of two concurrent creators exactly one wins.
    """
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(directory)
    return True


@contextlib.contextmanager
def lock_file(path: Path) -> Iterator[None]:
    """Hold an exclusive OS lock (``fcntl.flock``) on ``path``, created 0600 if needed; waits for
    another holder. Closing the descriptor on leaving releases it, also when a process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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

    @property
    def ledger_path(self) -> Path:
        """The site's record-level privacy ledger."""
        return self.root / f"site-{self.site_id}.ledger.json"

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
            raise ConfigError(f"cannot create the site state folder {str(self.root)!r}: {exc}") from None
        if not self.root.is_dir():
            raise ConfigError(f"site state folder {str(self.root)!r} is not a folder")
        return self

    def has_released(self) -> bool:
        """Whether this site has ever taken part in anything that released data: its key or
        round journal exists. A ledger missing beside either has been lost, not never made."""
        return self.key_path.exists() or self.journal_path.exists()

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
