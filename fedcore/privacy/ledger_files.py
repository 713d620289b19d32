"""How a privacy ledger lies on disk: its document and checksum, its seal, and its lock.

A ledger file ``<name>.json`` is one JSON object whose ``sha256`` is the SHA-256 of the rest in
canonical form (:func:`digest`); it is replaced atomically (:func:`fedcore._files.atomic_write`).
Beside it, ``<name>.seal`` records how many charges the ledger held when last written and that
ledger's digest (issue 11), and ``.<name>.lock`` is the OS lock a writer holds
(:func:`fedcore._files.lock_file`). :mod:`fedcore.privacy.ledger` says what the seal means; this
module only reads and writes the files, and raises :class:`CorruptLedgerError` for one that does not
parse.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from fedcore._files import atomic_write
from fedcore.errors import InvalidMessage

SEAL_FORMAT = "fedcore.privacy.ledger-seal"


class CorruptLedgerError(InvalidMessage):
    """A ledger file could not be parsed or failed its integrity check; the file is untouched."""


def seal_path_of(path: str | os.PathLike[str]) -> Path:
    """The seal beside ledger ``path``: ``site-3.ledger.json`` -> ``site-3.ledger.seal``."""
    p = Path(path)
    return p.with_name(p.name.removesuffix(".json") + ".seal")


def lock_path_of(path: str | os.PathLike[str]) -> Path:
    """The lock file beside ledger ``path``: ``site-3.ledger.json`` -> ``.site-3.ledger.lock``."""
    p = Path(path)
    return p.with_name("." + p.name.removesuffix(".json") + ".lock")


def digest(body: dict[str, Any]) -> str:
    """The SHA-256 (hex) of a ledger document without its ``sha256`` key, in canonical JSON."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_document(path: Path, doc: dict[str, Any]) -> None:
    """Write ledger document ``doc`` to ``path`` so that a reader sees the old file or the new,
    never a mix (mode 0600). The text is the one :func:`digest` was computed over, indented."""
    atomic_write(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def read_seal(path: Path) -> dict[str, Any] | None:
    """The seal of ledger ``path`` (None if there is none); CorruptLedgerError if unreadable."""
    seal = seal_path_of(path)
    if not seal.exists():
        return None
    try:
        doc = json.loads(seal.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptLedgerError(f"ledger seal {str(seal)!r} is unreadable: {exc}") from None
    charges = doc.get("charges") if isinstance(doc, dict) else None
    if (
        not isinstance(doc, dict)
        or doc.get("format") != SEAL_FORMAT
        or isinstance(charges, bool)
        or not isinstance(charges, int)
        or charges < 0
    ):
        raise CorruptLedgerError(f"ledger seal {str(seal)!r} is malformed: {doc!r:.200}")
    return doc


def write_seal(
    path: Path, *, charges: int, digest: str | None, pending_reset: str | None = None
) -> None:
    """Seal ledger ``path``: ``charges`` entries with digest ``digest`` (None: no ledger yet), and
    an operator's ``pending_reset`` label for the ledger created next (:func:`~fedcore.privacy.ledger.reset_ledger`)."""
    doc: dict[str, Any] = {"format": SEAL_FORMAT, "charges": charges, "ledger_sha256": digest}
    if pending_reset is not None:
        doc["pending_reset"] = pending_reset
    atomic_write(seal_path_of(path), (json.dumps(doc, sort_keys=True) + "\n").encode("utf-8"))
