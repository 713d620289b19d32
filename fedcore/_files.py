"""How fedcore writes and reads a file it keeps: one helper, below every layer.

Every file fedcore keeps across a crash or a restart (a site's key, round journal and ledger, the
federation ledger and its participation tally, the run record, the checkpoint) is written here, so
that each guarantee is implemented once:

- :func:`atomic_write` / :func:`atomic_write_through`: a reader sees the old file or the new one,
  never a mix, and the new one survives a power cut once the call returns: the data goes to a
  temporary file in the same folder, which is fsynced, renamed over the old file, and then the
  folder is fsynced (without that last step the rename itself may be lost). The file gets exactly
  ``mode`` (0600 unless the caller says otherwise), whatever the umask.
- :func:`create_exclusive`: written once, never replaced. The file is written under a temporary
  name and linked into place (``link`` fails if the name exists), so it appears whole and of two
  concurrent creators exactly one wins.
- :func:`read_private`: the bytes of a secret file, refused (:class:`ConfigError`) when the file is
  a symbolic link, is not owned by this user, or can be read or written by anyone else, so a key
  planted by another user or a link to a file an attacker controls is never used silently.
- :func:`lock_file`: an exclusive OS advisory lock (``fcntl.flock``) held while a file is read,
  checked and rewritten, so two processes never interleave a read-modify-write. The kernel drops
  it when the holder dies, however it dies.
- :func:`json_bytes`: strict JSON (RFC 8259): a non-finite float (NaN, infinity) is written as
  ``null``, never as the bare ``NaN`` that Python's :mod:`json` writes by default and other
  readers refuse.

This module imports nothing from fedcore but :mod:`fedcore.errors`, so any layer may use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from fedcore.errors import ConfigError

PRIVATE_MODE = 0o600  # secrets, ledgers, and what the privacy guarantees do not cover
PUBLIC_MODE = 0o644  # the published run record


def check_private(path: Path) -> None:
    """Raise :class:`ConfigError` unless ``path`` is a regular file (not a link), owned by this
    user, with no permission for group or others. Nothing is changed."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ConfigError(f"{str(path)!r} does not exist") from None
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(
            f"{str(path)!r} is a symbolic link; a site's secret files must be plain files"
        )
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


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new name in ``directory`` durable (fsync of the folder itself)."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _folder_of(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def atomic_write_through(
    path: str | os.PathLike[str],
    write: Callable[[IO[bytes]], object],
    *,
    mode: int = PRIVATE_MODE,
) -> None:
    """Replace ``path`` atomically and durably with what ``write(handle)`` writes to a binary
    handle (for a writer that streams, such as ``torch.save``).

    Temporary file in the same folder (created 0600, then given ``mode``), fsync, rename over
    ``path``, fsync of the folder. If ``write`` or any step raises, the exception propagates, the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    directory = _folder_of(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = PRIVATE_MODE) -> None:
    """Replace ``path`` with ``data`` atomically and durably (:func:`atomic_write_through`)."""
    atomic_write_through(path, lambda handle: handle.write(data), mode=mode)


def create_exclusive(
    path: str | os.PathLike[str], data: bytes, *, mode: int = PRIVATE_MODE
) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True if this call created it.

    The file appears whole: it is written under a temporary name and linked into place, so a
    concurrent reader never sees it half-written, and of two concurrent creators exactly one wins.
    An existing file is never touched (False).
    """
    path = Path(path)
    directory = _folder_of(path)
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
    fsync_dir(directory)
    return True


@contextlib.contextmanager
def lock_file(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive OS lock (``fcntl.flock``) on ``path``, created 0600 if needed; waits for
    another holder. Closing the descriptor on leaving releases it, also when a process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-infinity) inside it replaced by None.

    Mappings and lists/tuples are walked (a tuple becomes a list, as JSON has no tuple); any
    other value is returned as it is.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    return value


def json_bytes(doc: Any, *, indent: int | None = 2, sort_keys: bool = False) -> bytes:
    """``doc`` as strict JSON (UTF-8): non-finite floats become ``null`` (:func:`finite_or_null`).

    Raises ``TypeError`` for a value JSON cannot hold. No trailing newline.
    """
    text = json.dumps(finite_or_null(doc), indent=indent, sort_keys=sort_keys, allow_nan=False)
    return text.encode("utf-8")
