"""An append-only privacy ledger with a budget, persisted atomically as JSON.

Theory of operation. A ledger belongs to one *scope*: one site's record-level DP (the unit of
privacy is one training record of that site), or the federation's site-level DP (the unit is one
whole site). Its history is a sequence of :mod:`~fedcore.privacy.events`; its spend is the epsilon
of their composition at the budget's delta, as computed by the ledger's accountant (sequential,
adaptive composition: Dwork, Rothblum and Vadhan 2010; for PLD, Koskela et al. 2020). Because
epsilon is recomputed from the whole history, charges of different kinds compose correctly and
no per-charge rounding accumulates.

A charge checks first and commits second, as dp_accounting's ``PrivacyAccountant.compose`` does
with its ``_maybe_compose(do_compose=False)`` pass: the epsilon the ledger would have after the
charge is computed on a copy of the history; if it passes the budget, :class:`BudgetExceededError`
is raised and the ledger is left exactly as it was. A caller charges *before* releasing the result
the event describes, so a refusal withholds the result.

A ledger opened on a file is durable: every charge is written to disk (temporary file, fsync,
rename over the old file, fsync of the directory) before the in-memory ledger changes and before
``charge`` returns. A crash leaves either the old or the new file, never a torn one. A file that
does not parse, fails its SHA-256 checksum or holds malformed events raises
:class:`CorruptLedgerError` and is left untouched.

A ledger cannot lose a charge (issue 11, point 5):

- *One writer at a time.* A charge holds an OS lock (``fcntl.flock`` on ``.<name>.lock`` beside
  the file, :func:`fedcore._files.lock_file`), re-reads the file under it, adopts
  charges another process committed meanwhile, checks the budget against the full history, and
  only then writes. Two processes charging one file both end up in it, or one is refused.
- *A seal beside the ledger.* Every write is followed by the *seal* (``<name>.seal``): the number
  of charges and the digest of the ledger just written. Opening a ledger whose seal records more
  charges than the file holds (an older copy put back), or whose file is gone while its seal (or,
  for a site, its secure-aggregation key or round journal) remains, raises
  :class:`~fedcore.errors.LedgerLostError`: the scope refuses to release anything until an
  operator runs :func:`reset_ledger` (``fedcore ledger reset``), which the ledger records as an
  entry. The ledger is written before its seal, so a crash between the two leaves a ledger newer
  than its seal, which opens (and the seal is brought up to date). What the seal does not catch:
  the ledger and its seal removed or restored *together* where nothing else marks the scope as
  used; keep the state folder where only the operator writes.

The files themselves (document, checksum, seal, lock) are :mod:`fedcore.privacy.ledger_files`;
:class:`Scope` and :class:`Budget` are :mod:`fedcore.privacy.scope`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore._files import lock_file
from fedcore.errors import BudgetExceededError, ConfigError, InvalidMessage, LedgerLostError
from fedcore.privacy.accountant import (
    DEFAULT_ACCOUNTANT,
    AccountantKind,
    epsilon,
    parse_accountant,
)
from fedcore.privacy.events import NoPrivacyLoss, PrivacyEvent, event_from_json, event_to_json
from fedcore.privacy.ledger_files import (
    CorruptLedgerError,
    digest,
    lock_path_of,
    read_seal,
    seal_path_of,
    write_document,
    write_seal,
)
from fedcore.privacy.scope import Budget, Scope, ScopeKind

FORMAT = "fedcore.privacy.ledger"
VERSION = 1
# The federation ledger's file in its state folder (dp.server.state_dir, or the run record).
FEDERATION_LEDGER_FILE = "federation.ledger.json"

__all__ = [
    "FEDERATION_LEDGER_FILE",
    "Budget",
    "CorruptLedgerError",
    "LedgerEntry",
    "PrivacyLedger",
    "Scope",
    "ScopeKind",
    "lock_path_of",
    "reset_ledger",
    "seal_path_of",
]


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One committed charge. ``epsilon_after`` is the spend once it was committed (for audit)."""

    event: PrivacyEvent
    round_number: int | None
    label: str
    epsilon_after: float


class PrivacyLedger:
    """The privacy spend of one scope against its budget.

    ``PrivacyLedger(scope=..., budget=...)`` is an in-memory ledger. ``PrivacyLedger.open(path,
    ...)`` loads the file at ``path`` or creates it, and then persists every charge there;
    ``PrivacyLedger.load(path)`` loads an existing file. Not thread-safe.
    """

    __slots__ = ("_scope", "_budget", "_accountant", "_entries", "_path")

    def __init__(
        self,
        *,
        scope: Scope,
        budget: Budget,
        accountant: AccountantKind | str = DEFAULT_ACCOUNTANT,
        entries: tuple[LedgerEntry, ...] = (),
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(scope, Scope) or not isinstance(budget, Budget):
            raise ConfigError(f"a ledger needs a Scope and a Budget, got {scope!r}, {budget!r}")
        self._scope = scope
        self._budget = budget
        self._accountant = parse_accountant(accountant)
        self._entries = tuple(entries)
        self._path = None if path is None else Path(path)

    # --- reading -----------------------------------------------------------------------------

    @property
    def scope(self) -> Scope:
        return self._scope

    @property
    def budget(self) -> Budget:
        return self._budget

    @property
    def accountant(self) -> AccountantKind:
        return self._accountant

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return self._entries

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        return tuple(e.event for e in self._entries)

    def epsilon(self) -> float:
        """Epsilon spent so far, at the budget's delta (0.0 for an empty ledger)."""
        return self._epsilon_of(self.events)

    def epsilon_if_charged(self, event: PrivacyEvent) -> float:
        """The epsilon the ledger would report after charging ``event``; charges nothing."""
        return self._epsilon_of((*self.events, event))

    def check(self, event: PrivacyEvent) -> float:
        """Raise :class:`BudgetExceededError` if ``event`` would not fit; else the epsilon after.

        Charges nothing. Also raises :class:`ConfigError` (or its subclass
        ``UnsupportedEventError``) for an event the accountant cannot analyse.
        """
        if not isinstance(event, PrivacyEvent):
            raise ConfigError(f"a ledger charges PrivacyEvents, got {event!r}")
        after = self.epsilon_if_charged(event)
        if not after <= self._budget.epsilon:
            raise BudgetExceededError(
                f"{self._scope.kind.value} ledger {self._scope.name!r}: charging {event} would "
                f"spend epsilon {after:.6g} > budget {self._budget.epsilon:g} at delta "
                f"{self._budget.delta:g} (spent so far {self.epsilon():.6g}); nothing was charged"
            )
        return after

    def can_afford(self, event: PrivacyEvent) -> bool:
        """Whether :meth:`charge` would accept ``event`` now (for declining before training)."""
        try:
            self.check(event)
        except BudgetExceededError:
            return False
        return True

    def _epsilon_of(self, events: tuple[PrivacyEvent, ...]) -> float:
        return epsilon(events, delta=self._budget.delta, accountant=self._accountant)

    # --- writing -----------------------------------------------------------------------------

    def charge(
        self, event: PrivacyEvent, *, round_number: int | None = None, label: str = ""
    ) -> LedgerEntry:
        """Check ``event`` against the budget, then commit it; return the new entry.

        Raises :class:`BudgetExceededError` (ledger unchanged) if the budget would be passed. For a
        ledger opened on a file, the new history is written durably before the in-memory ledger
        changes; if that write fails, the ``OSError`` propagates and the ledger and file are
        unchanged.
        """
        if round_number is not None and (
            isinstance(round_number, bool) or not isinstance(round_number, int)
        ):
            raise ConfigError(f"round_number must be an integer or None, got {round_number!r}")
        if self._path is None:
            after = self.check(event)
            entry = LedgerEntry(
                event=event, round_number=round_number, label=str(label), epsilon_after=after
            )
            self._entries = (*self._entries, entry)
            return entry
        with lock_file(lock_path_of(self._path)):
            self._sync_from_disk()
            after = self.check(event)
            entry = LedgerEntry(
                event=event, round_number=round_number, label=str(label), epsilon_after=after
            )
            entries = (*self._entries, entry)
            self._write(entries)
            self._entries = entries
        return entry

    def _sync_from_disk(self) -> None:
        """Adopt charges another process committed to this file (call with the lock held)."""
        assert self._path is not None
        if not self._path.exists():
            raise LedgerLostError(
                f"ledger {str(self._path)!r} disappeared while in use; nothing was charged. "
                "Run `fedcore ledger reset` once you know what it held"
            )
        disk = PrivacyLedger.load(self._path)
        if disk.entries[: len(self._entries)] != self._entries:
            raise CorruptLedgerError(
                f"ledger {str(self._path)!r} was rewritten by another process with a different "
                "history; nothing was charged"
            )
        self._entries = disk.entries

    def _write(self, entries: tuple[LedgerEntry, ...]) -> None:
        """The ledger, then its seal (call with the lock held)."""
        assert self._path is not None
        doc = self._document(entries)
        write_document(self._path, doc)
        write_seal(self._path, charges=len(entries), digest=doc["sha256"])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger to ``path`` atomically (temp file, fsync, rename, fsync dir)."""
        write_document(Path(path), self._document(self._entries))

    def to_json(self) -> dict[str, Any]:
        """The ledger as the JSON object :meth:`save` writes (with its checksum)."""
        return self._document(self._entries)

    def _document(self, entries: tuple[LedgerEntry, ...]) -> dict[str, Any]:
        body = {
            "format": FORMAT,
            "version": VERSION,
            "scope": {"kind": self._scope.kind.value, "name": self._scope.name},
            "budget": {"epsilon": self._budget.epsilon, "delta": self._budget.delta},
            "accountant": self._accountant.value,
            "entries": [
                {
                    "event": event_to_json(e.event),
                    "round": e.round_number,
                    "label": e.label,
                    "epsilon_after": e.epsilon_after,
                }
                for e in entries
            ],
        }
        return {**body, "sha256": digest(body)}

    # --- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Load the ledger at ``path``; later charges are persisted there.

        Raises :class:`CorruptLedgerError` for a file that is not a valid ledger (the file is
        left as it was) and ``FileNotFoundError`` for a missing one.
        """
        raw = Path(path).read_bytes()
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptLedgerError(
                f"ledger file {str(path)!r} is not valid JSON: {exc}"
            ) from None
        return cls.from_json(doc, path=path)

    @classmethod
    def from_json(cls, doc: object, *, path: str | os.PathLike[str] | None = None) -> PrivacyLedger:
        """Rebuild a ledger from :meth:`to_json` output; :class:`CorruptLedgerError` if invalid."""
        where = f"ledger {str(path)!r}" if path is not None else "ledger document"
        if not isinstance(doc, dict):
            raise CorruptLedgerError(f"{where}: expected a JSON object, got {type(doc).__name__}")
        body = {k: v for k, v in doc.items() if k != "sha256"}
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise CorruptLedgerError(
                f"{where}: expected format {FORMAT!r} version {VERSION}, got "
                f"{doc.get('format')!r} version {doc.get('version')!r}"
            )
        if doc.get("sha256") != digest(body):
            raise CorruptLedgerError(f"{where}: checksum mismatch (the file was altered or torn)")
        try:
            scope = Scope(kind=ScopeKind(body["scope"]["kind"]), name=body["scope"]["name"])
            budget = Budget(epsilon=body["budget"]["epsilon"], delta=body["budget"]["delta"])
            accountant = parse_accountant(body["accountant"])
            entries = tuple(_entry_from_json(e) for e in body["entries"])
        except (KeyError, TypeError, ValueError, ConfigError, InvalidMessage) as exc:
            raise CorruptLedgerError(f"{where}: malformed content: {exc}") from None
        return cls(scope=scope, budget=budget, accountant=accountant, entries=entries, path=path)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        scope: Scope,
        budget: Budget,
        accountant: AccountantKind | str = DEFAULT_ACCOUNTANT,
        released: bool = False,
    ) -> PrivacyLedger:
        """Load the ledger at ``path``, or create it there (empty) if there is no file.

        An existing file must have the same scope, budget and accountant: a budget is never
        silently changed. Raises :class:`ConfigError` on a mismatch, :class:`CorruptLedgerError`
        for a bad file, :class:`~fedcore.errors.LedgerLostError` when the file is missing or older
        than its seal records, or missing while ``released`` says the scope has released data
        before (a site's key or round journal exists). Holds the ledger's lock while it looks.
        """
        path = Path(path)
        with lock_file(lock_path_of(path)):
            seal = read_seal(path)
            if path.exists():
                return cls._open_existing(
                    path, seal, wanted=(scope, budget, parse_accountant(accountant))
                )
            return cls._create(
                path, seal, scope=scope, budget=budget, accountant=accountant, released=released
            )

    @classmethod
    def _open_existing(
        cls,
        path: Path,
        seal: dict[str, Any] | None,
        *,
        wanted: tuple[Scope, Budget, AccountantKind],
    ) -> PrivacyLedger:
        """The ledger file at ``path``, checked against what was asked for and against its seal
        (call with the lock held); the seal is brought up to date if the ledger is newer."""
        ledger = cls.load(path)
        found = (ledger.scope, ledger.budget, ledger.accountant)
        if wanted != found:
            raise ConfigError(
                f"ledger {str(path)!r} holds scope/budget/accountant {found}, "
                f"but {wanted} was asked for"
            )
        charges, sha256 = len(ledger.entries), ledger.to_json()["sha256"]
        if seal is not None and (
            charges < seal["charges"]
            or (charges == seal["charges"] and sha256 != seal["ledger_sha256"])
        ):
            raise LedgerLostError(
                f"ledger {str(path)!r} holds {charges} charges but its seal records "
                f"{seal['charges']}: it is older than what this scope has released (a copy put "
                "back?). Nothing is released until an operator runs `fedcore ledger reset` for "
                f"{ledger.scope.name!r} with a reason"
            )
        if seal is None or charges > seal["charges"]:
            write_seal(path, charges=charges, digest=sha256)
        return ledger

    @classmethod
    def _create(
        cls,
        path: Path,
        seal: dict[str, Any] | None,
        *,
        scope: Scope,
        budget: Budget,
        accountant: AccountantKind | str,
        released: bool,
    ) -> PrivacyLedger:
        """A new ledger file at ``path`` (call with the lock held): empty, or holding the
        operator's pending reset first. Refused (LedgerLostError) where the scope has released
        before, by ``released`` or its seal, and no reset is pending."""
        pending = None if seal is None else seal.get("pending_reset")
        if pending is None and (released or (seal is not None and seal["charges"] > 0)):
            why = (
                f"its seal records {seal['charges']} charges"
                if seal is not None and seal["charges"] > 0
                else "it has released data before (a site key, round journal or participation tally exists)"
            )
            raise LedgerLostError(
                f"ledger {str(path)!r} is missing but {why}: its spend would restart at 0. "
                f"Nothing is released until an operator runs `fedcore ledger reset` for "
                f"{scope.name!r} with a reason"
            )
        ledger = cls(scope=scope, budget=budget, accountant=accountant, path=path)
        entries: tuple[LedgerEntry, ...] = ()
        if pending is not None:
            reset = LedgerEntry(
                event=NoPrivacyLoss(), round_number=None, label=str(pending), epsilon_after=0.0
            )
            entries = (reset,)
        ledger._write(entries)
        ledger._entries = entries
        return ledger

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger({self._scope.kind.value}:{self._scope.name}, "
            f"{len(self._entries)} entries, budget=({self._budget.epsilon}, {self._budget.delta}), "
            f"accountant={self._accountant.value})"
        )


def _entry_from_json(obj: Any) -> LedgerEntry:
    if not isinstance(obj, dict) or set(obj) != {"event", "round", "label", "epsilon_after"}:
        raise CorruptLedgerError(f"malformed ledger entry {obj!r}")
    rnd, label, eps = obj["round"], obj["label"], obj["epsilon_after"]
    if rnd is not None and (isinstance(rnd, bool) or not isinstance(rnd, int)):
        raise CorruptLedgerError(f"entry round must be an integer or null, got {rnd!r}")
    if not isinstance(label, str) or not isinstance(eps, int | float):
        raise CorruptLedgerError(f"malformed ledger entry {obj!r}")
    return LedgerEntry(
        event=event_from_json(obj["event"]), round_number=rnd, label=label, epsilon_after=eps
    )


def reset_ledger(path: str | os.PathLike[str], *, reason: str) -> str:
    """An operator's explicit reset of a ledger that refuses to open (:class:`LedgerLostError`).

    With the lock held: a ledger file that loads gets a :class:`NoPrivacyLoss` entry labelled with
    the reset, the reason and how many charges the seal had recorded, and a new seal. A file that
    does not load is moved aside (``<name>.corrupt``); with no file, the seal is set to a pending
    reset, and the next :meth:`PrivacyLedger.open` creates the ledger with that entry first.
    Returns a one-line account of what was done. Raises :class:`ConfigError` without a reason.
    """
    if not isinstance(reason, str) or not reason.strip():
        raise ConfigError("a ledger reset needs a reason (--reason), which the ledger records")
    path = Path(path)
    import datetime as dt

    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    with lock_file(lock_path_of(path)):
        try:
            seal = read_seal(path)
        except CorruptLedgerError:
            seal = None
        sealed = 0 if seal is None else seal["charges"]
        if path.exists():
            try:
                ledger = PrivacyLedger.load(path)
            except CorruptLedgerError:
                os.replace(path, path.with_name(path.name + ".corrupt"))
            else:
                label = (
                    f"operator reset at {when}: {reason.strip()} (the seal recorded {sealed} "
                    f"charges; this ledger holds {len(ledger.entries)})"
                )
                entry = LedgerEntry(
                    event=NoPrivacyLoss(),
                    round_number=None,
                    label=label,
                    epsilon_after=ledger.epsilon(),
                )
                ledger._write((*ledger.entries, entry))
                return f"{path}: recorded '{label}'"
        label = (
            f"operator reset at {when}: {reason.strip()} (the ledger was missing or unreadable; "
            f"the seal recorded {sealed} charges)"
        )
        write_seal(path, charges=0, digest=None, pending_reset=label)
        return f"{path}: the ledger is created at its next use with the entry '{label}'"
