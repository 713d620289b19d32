"""A site's durable round journal: what it has sent, per round id, across runs and restarts.

Theory of operation. Flower keeps a ClientApp's ``context.state`` per run and a SuperNode restart
loses it, while the site's key outlives both. Every rule that keeps a site from revealing more
than the protocol allows is therefore checked against a file on the site's own disk
(:attr:`SiteStore.journal_path`, mode 0600), written and fsynced before the answer it permits
leaves the site (:func:`fedcore.federation.site_store.atomic_write`), under the site's OS lock. Per
round id it holds:

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
or a journal that does not parse, is refused with :class:`~fedcore.errors.CorruptJournalError`
(the operator must restore it; a site that forgot its history could be replayed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from fedcore.errors import ConfigError, CorruptJournalError, LocalProtocolError
from fedcore.federation.site_store import SiteStore, atomic_write, create_exclusive, read_private

FORMAT = "fedcore.secagg.journal/1"
KEY_BYTES = 32
NONCE_BYTES = 32


@dataclass(frozen=True, slots=True)
class RoundEntry:
    """What a site did in one round (see the module docstring)."""

    nonce: bytes
    session: bytes | None = None
    masked: bool = False
    signed: bool = False
    unmasked: bool = False
    seed_shares_of: tuple[int, ...] = ()
    key_shares_of: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "nonce": self.nonce.hex(),
            "session": None if self.session is None else self.session.hex(),
            "masked": self.masked,
            "signed": self.signed,
            "unmasked": self.unmasked,
            "seed-shares-of": list(self.seed_shares_of),
            "key-shares-of": list(self.key_shares_of),
        }

    @classmethod
    def from_json(cls, doc: Any) -> RoundEntry:
        """Raises ValueError / TypeError / KeyError on a malformed entry (the caller wraps them)."""
        session = doc["session"]
        entry = cls(
            nonce=bytes.fromhex(doc["nonce"]),
            session=None if session is None else bytes.fromhex(session),
            masked=_flag(doc["masked"]),
            signed=_flag(doc["signed"]),
            unmasked=_flag(doc["unmasked"]),
            seed_shares_of=tuple(_peer(p) for p in doc["seed-shares-of"]),
            key_shares_of=tuple(_peer(p) for p in doc["key-shares-of"]),
        )
        if len(entry.nonce) != NONCE_BYTES:
            raise ValueError("bad nonce")
        return entry


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {value!r}")
    return value


def _peer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected a node id, got {value!r}")
    return value


class RoundJournal:
    """The journal file of one site. Every method reads the file afresh (another process of the
    site may have written it); every change is made under the site's lock and is durable when the
    method returns."""

    def __init__(self, store: SiteStore) -> None:
        self.store = store

    # ------------------------------------------------------------------ opening

    @classmethod
    def open_site(cls, store: SiteStore) -> tuple[bytes, RoundJournal]:
        """The site's secure-aggregation key and its journal, both created on first use.

        The journal is created before the key, so a key always has one. Raises
        :class:`CorruptJournalError` for a key without a journal or a damaged journal,
        :class:`ConfigError` for a key file that is not private (a symbolic link, another owner,
        readable by others) or of the wrong size. Nothing is overwritten.
        """
        store.ensure()
        journal = cls(store)
        with store.lock("journal"):
            key_exists = os.path.lexists(store.key_path)
            if not os.path.lexists(store.journal_path):
                if key_exists:
                    raise CorruptJournalError(
                        f"the round journal {str(store.journal_path)!r} is missing beside the "
                        "site's secure-aggregation key; refusing to take part (restore the journal: "
                        "a site that forgot its rounds could be replayed)"
                    )
                atomic_write(store.journal_path, _dump({}))
            journal._load()  # refuses a damaged journal before the key is used or created
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
        return self._load().get(round_id.hex())

    def _load(self) -> dict[str, RoundEntry]:
        path = self.store.journal_path
        data = read_private(path)  # ConfigError for a link, another owner, a readable file
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}")
            rounds = {str(rid): RoundEntry.from_json(e) for rid, e in doc["rounds"].items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CorruptJournalError(
                f"the round journal {str(path)!r} is damaged ({type(exc).__name__}: {exc}); "
                "refusing to take part (the file is left as it is)"
            ) from None
        return rounds

    # ------------------------------------------------------------------ changing

    def begin(self, round_id: bytes) -> RoundEntry:
        """Start ``round_id`` with a fresh nonce. Raises LocalProtocolError if the journal already
        holds it: a round id is served once, ever."""

        def start(entry: RoundEntry | None) -> RoundEntry:
            if entry is not None:
                raise LocalProtocolError(
                    "refused: this site already took part in a round with this round id "
                    "(a replayed round id; the round journal keeps every round id it served)"
                )
            return RoundEntry(nonce=os.urandom(NONCE_BYTES))

        return self.update(round_id, start)

    def update(
        self, round_id: bytes, change: Callable[[RoundEntry | None], RoundEntry]
    ) -> RoundEntry:
        """Under the site's lock: read the entry, apply ``change`` (which raises to refuse), write
        the journal durably, return the new entry. A refusal leaves the file unchanged."""
        with self.store.lock("journal"):
            rounds = self._load()
            entry = change(rounds.get(round_id.hex()))
            rounds[round_id.hex()] = entry
            atomic_write(self.store.journal_path, _dump(rounds))
        return entry

    def bind_session(self, round_id: bytes, session: bytes) -> RoundEntry:
        """Record the session answered at the share-keys stage; refuse a second, different one."""

        def bind(entry: RoundEntry | None) -> RoundEntry:
            current = _started(entry)
            if current.session is not None and current.session != session:
                raise LocalProtocolError(
                    "refused: this site already serves another session under this round id"
                )
            return replace(current, session=session)

        return self.update(round_id, bind)

    def mark(self, round_id: bytes, session: bytes | None, **done: Any) -> RoundEntry:
        """Record that an answer of a once-only kind (``masked``, ``signed``, ``unmasked``) is
        about to leave; refuse if it already left or the session differs."""

        def apply(entry: RoundEntry | None) -> RoundEntry:
            current = _started(entry)
            check_session(current, session)
            for kind in ("masked", "signed", "unmasked"):
                if done.get(kind) and getattr(current, kind):
                    raise LocalProtocolError(
                        f"refused: this site already sent its {kind} answer for this round id"
                    )
            after = replace(current, **done)
            if set(after.seed_shares_of) & set(after.key_shares_of):
                raise LocalProtocolError(
                    "refused: this answer would reveal both shares of one peer"
                )
            return after

        return self.update(round_id, apply)


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


def _dump(rounds: dict[str, RoundEntry]) -> bytes:
    doc = {"format": FORMAT, "rounds": {rid: e.to_json() for rid, e in rounds.items()}}
    return json.dumps(doc, separators=(",", ":")).encode()
