"""A site's durable round journal: what it has sent, per round id, across runs and restarts.

Theory of operation. Flower keeps a ClientApp's ``context.state`` per run and a SuperNode restart
loses it, while the site's key outlives both. Every rule that keeps a site from revealing more
than the protocol allows is therefore checked against a file on the site's own disk
(:attr:`SiteStore.journal_path`, mode 0600), appended to before the answer it permits leaves the
site, under the site's OS lock: one JSON line per event, nothing rewritten (a line torn by a crash
mid-append belonged to an answer that never left, and is cut off before the next append). The
answers whose repetition would leak (the masked input, the survivor signature, the unmask answer)
leave only after an fsync of the file, which makes every earlier line of it durable too; the
advert and share answers are appended without one (every later process of the site sees them): a
crash that loses those lines loses the round's nonce with them, hence the round's secrets, so the
round can only be abandoned, never repeated. Per round id it holds:

- ``nonce``: 32 fresh bytes from the OS CSPRNG, drawn when the site first sees the round id. Every
  per-round secret is drawn from ``derive_rng(site key, "secagg|" + round id + "|" + nonce)``, so
  a server that reuses a round id cannot make the site re-create a round's masks or keys;
- ``session``: the session id the site answered the share-keys stage for (one session per round);
- ``masked``: a masked input was sent (at most one per round id);
- ``signed``: a survivor set was signed (ACTIVE mode; at most one);
- ``unmasked``: an unmask request was answered (at most one), and for which peers the site
  released a self-mask-seed share and for which a mask-key share (never both for one peer).

A round id the journal already holds is never started again, so the same round id cannot be run
twice, in one run (after the transcript in ``context.state`` was evicted), in another run, or after
a restart. The journal is created before the key and never recreated: a key without its journal,
a journal without its header, or a line of the round in question that does not parse or breaks the
order above (an event before the round began, a round begun twice) is refused with
:class:`~fedcore.errors.CorruptJournalError` (the operator must restore it; a site that forgot its
history could be replayed). Only the lines of the round in question are parsed at each stage, so a
stage costs one read and one append (and at most one fsync) whatever the site's history.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from fedcore._files import create_exclusive, read_private
from fedcore.errors import ConfigError, CorruptJournalError, LocalProtocolError
from fedcore.federation.site.store import SiteStore

FORMAT = "fedcore.secagg.journal/1"
HEADER = json.dumps({"format": FORMAT}).encode() + b"\n"
KEY_BYTES = 32
NONCE_BYTES = 32
_ONCE = ("masked", "signed", "unmasked")


@dataclass(frozen=True, slots=True)
class RoundEntry:
    """What a site did in one round (see the module docstring): the fold of the round's lines."""

    nonce: bytes
    session: bytes | None = None
    masked: bool = False
    signed: bool = False
    unmasked: bool = False
    seed_shares_of: tuple[int, ...] = ()
    key_shares_of: tuple[int, ...] = ()


def _apply(entry: RoundEntry | None, record: dict[str, Any]) -> RoundEntry:
    """``entry`` after one journal line. Raises ValueError / TypeError / KeyError when the line is
    malformed or out of order (the caller reports a damaged journal)."""
    if "nonce" in record:
        if entry is not None:
            raise ValueError("a round begun twice")
        nonce = bytes.fromhex(record["nonce"])
        if len(nonce) != NONCE_BYTES:
            raise ValueError("bad nonce")
        return RoundEntry(nonce=nonce)
    if entry is None:
        raise ValueError("an event before the round began")
    if "session" in record:
        return replace(entry, session=bytes.fromhex(record["session"]))
    kinds = [k for k in _ONCE if record.get(k) is True]
    if len(kinds) != 1:
        raise ValueError(f"unknown event {sorted(record)}")
    if kinds == ["unmasked"]:
        return replace(
            entry,
            unmasked=True,
            seed_shares_of=tuple(_peer(p) for p in record["seed-shares-of"]),
            key_shares_of=tuple(_peer(p) for p in record["key-shares-of"]),
        )
    if kinds == ["masked"]:
        return replace(entry, masked=True)
    return replace(entry, signed=True)


def _lines_with(data: bytes, marker: bytes) -> list[bytes]:
    """The lines of ``data`` that contain ``marker`` (a scan with ``find``, not a split)."""
    found = []
    pos = data.find(marker, len(HEADER))
    while pos >= 0:
        start = data.rfind(b"\n", 0, pos) + 1
        end = data.find(b"\n", pos)
        found.append(data[start:end])
        pos = data.find(marker, end)
    return found


def _peer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected a node id, got {value!r}")
    return value


class RoundJournal:
    """The journal file of one site. Every method reads the file afresh (another process of the
    site may have written it); every change is made under the site's lock and is durable when the
    method returns. A refusal leaves the file unchanged."""

    def __init__(self, store: SiteStore) -> None:
        self.store = store

    # ------------------------------------------------------------------ opening

    @classmethod
    def open_site(cls, store: SiteStore) -> tuple[bytes, RoundJournal]:
        """The site's secure-aggregation key and its journal, both created on first use.

        The journal is created before the key, so a key always has one. Raises
        :class:`CorruptJournalError` for a key without a journal or a journal without its header,
        :class:`ConfigError` for a key or journal file that is not private (a symbolic link,
        another owner, readable by others) or a key of the wrong size. Nothing is overwritten.
        """
        store.ensure()
        journal = cls(store)
        with store.lock("journal"):
            key_exists = os.path.lexists(store.key_path)
            if not os.path.lexists(store.journal_path):
                if key_exists:
                    raise CorruptJournalError(
                        f"the round journal {str(store.journal_path)!r} is missing beside the "
                        "site's secure-aggregation key; refusing to take part (restore the "
                        "journal: a site that forgot its rounds could be replayed)"
                    )
                create_exclusive(store.journal_path, HEADER)
            journal._read()  # refuses a foreign or damaged file before the key is used or made
            if not key_exists:
                create_exclusive(store.key_path, os.urandom(KEY_BYTES))
        key = read_private(store.key_path)
        if len(key) != KEY_BYTES:
            raise ConfigError(
                f"secagg key {str(store.key_path)!r} holds {len(key)} bytes, expected {KEY_BYTES}"
            )
        return key, journal

    # ------------------------------------------------------------------ reading

    def entry(self, round_id: bytes) -> RoundEntry | None:
        """The entry of ``round_id``, None if the site never saw it."""
        return self._entry(self._read(), round_id)

    def _read(self) -> bytes:
        """The file's complete lines (a torn last line is left out); refuses a missing header."""
        path = self.store.journal_path
        data = read_private(path)  # ConfigError for a link, another owner, a readable file
        if not data.startswith(HEADER):
            raise self._damaged("no journal header")
        return data[: data.rfind(b"\n") + 1]

    def _entry(self, lines: bytes, round_id: bytes) -> RoundEntry | None:
        wanted = round_id.hex()
        marker = f'"round":"{wanted}"'.encode()
        entry = None
        for line in _lines_with(lines, marker):  # another round's lines are not parsed here
            try:
                record = json.loads(line)
                if record.get("round") == wanted:
                    entry = _apply(entry, record)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise self._damaged(f"{type(exc).__name__}: {exc}") from None
        return entry

    def _damaged(self, why: str) -> CorruptJournalError:
        return CorruptJournalError(
            f"the round journal {str(self.store.journal_path)!r} is damaged ({why}); refusing to "
            "take part (the file is left as it is)"
        )

    # ------------------------------------------------------------------ changing

    def _commit(
        self,
        round_id: bytes,
        event: Callable[[RoundEntry | None], dict[str, Any]],
        *,
        durable: bool,
    ) -> RoundEntry:
        """Under the site's lock: read the round's entry, let ``event`` check it (it raises to
        refuse) and name the line to add, append that line (and with ``durable``, fsync the file:
        every earlier line with it); return the new entry."""
        with self.store.lock("journal"):
            lines = self._read()
            entry = self._entry(lines, round_id)
            record = {"round": round_id.hex(), **event(entry)}
            after = _apply(entry, record)
            line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
            fd = os.open(self.store.journal_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
            try:
                if os.fstat(fd).st_size != len(lines):
                    os.ftruncate(fd, len(lines))  # cut a line torn by a crash mid-append
                os.write(fd, line)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        return after

    def begin(self, round_id: bytes) -> RoundEntry:
        """Start ``round_id`` with a fresh nonce. Raises LocalProtocolError if the journal already
        holds it: a round id is served once, ever."""

        def start(entry: RoundEntry | None) -> dict[str, Any]:
            if entry is not None:
                raise LocalProtocolError(
                    "refused: this site already took part in a round with this round id "
                    "(a replayed round id; the round journal keeps every round id it served)"
                )
            return {"nonce": os.urandom(NONCE_BYTES).hex()}

        return self._commit(round_id, start, durable=False)

    def bind_session(self, round_id: bytes, session: bytes) -> RoundEntry:
        """Record the session answered at the reveal (sparse graph) or share-keys stage; refuse a
        second, different one."""

        def bind(entry: RoundEntry | None) -> dict[str, Any]:
            current = _started(entry)
            if current.session is not None and current.session != session:
                raise LocalProtocolError(
                    "refused: this site already serves another session under this round id"
                )
            return {"session": session.hex()}

        return self._commit(round_id, bind, durable=False)

    def mark(
        self,
        round_id: bytes,
        session: bytes | None,
        kind: str,
        *,
        seed_shares_of: tuple[int, ...] = (),
        key_shares_of: tuple[int, ...] = (),
    ) -> RoundEntry:
        """Record that an answer of a once-only ``kind`` (``masked``, ``signed``, ``unmasked``;
        with the last, whose seed shares and whose key shares it reveals) is about to leave;
        refuse if it already left, the session differs, or it would reveal both shares of a peer."""
        if kind not in _ONCE:
            raise LocalProtocolError(f"unknown journal event {kind!r}")

        def once(entry: RoundEntry | None) -> dict[str, Any]:
            current = _started(entry)
            check_session(current, session)
            if getattr(current, kind):
                raise LocalProtocolError(
                    f"refused: this site already sent its {kind} answer for this round id"
                )
            if kind != "unmasked":
                return {kind: True}
            if set(seed_shares_of) & set(key_shares_of):
                raise LocalProtocolError("refused: this answer would reveal both shares of one peer")
            return {
                "unmasked": True,
                "seed-shares-of": list(seed_shares_of),
                "key-shares-of": list(key_shares_of),
            }

        return self._commit(round_id, once, durable=True)


def _started(entry: RoundEntry | None) -> RoundEntry:
    if entry is None:
        raise LocalProtocolError("refused: the round journal has no such round id")
    return entry


def check_session(entry: RoundEntry, session: bytes | None) -> None:
    """Raise LocalProtocolError unless ``session`` is the one the site joined for this round."""
    if entry.session is None or session != entry.session:
        raise LocalProtocolError(
            "refused: this request belongs to another session than the one this site joined "
            "under this round id"
        )
