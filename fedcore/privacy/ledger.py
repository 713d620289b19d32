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
:class:`CorruptLedgerError` and is left untouched. A ledger is not safe for concurrent writers
(two processes charging one file): give each scope one owner.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore.errors import BudgetExceededError, ConfigError, InvalidMessage
from fedcore.privacy.accountant import (
    DEFAULT_ACCOUNTANT,
    AccountantKind,
    check_delta,
    epsilon,
    parse_accountant,
)
from fedcore.privacy.events import PrivacyEvent, event_from_json, event_to_json

FORMAT = "fedcore.privacy.ledger"
VERSION = 1


class CorruptLedgerError(InvalidMessage):
    """A ledger file could not be parsed or failed its integrity check; the file is untouched."""


class ScopeKind(enum.Enum):
    """Whose privacy a ledger accounts for."""

    SITE_RECORDS = "site_records"  # one site's records (record-level DP-SGD)
    FEDERATION_SITES = "federation_sites"  # whole sites, at the server (DP-FedAvg)


@dataclass(frozen=True, slots=True)
class Scope:
    kind: ScopeKind
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ScopeKind):
            raise ConfigError(f"scope kind must be a ScopeKind, got {self.kind!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"scope name must be a non-empty string, got {self.name!r}")


@dataclass(frozen=True, slots=True)
class Budget:
    """A total (epsilon, delta) a scope may spend."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not isinstance(self.epsilon, int | float) or not (
            math.isfinite(self.epsilon) and self.epsilon > 0
        ):
            raise ConfigError(f"budget epsilon must be finite and > 0, got {self.epsilon!r}")
        check_delta(self.delta)


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
        after = self.check(event)
        entry = LedgerEntry(
            event=event, round_number=round_number, label=str(label), epsilon_after=after
        )
        entries = (*self._entries, entry)
        if self._path is not None:
            _atomic_write(self._path, self._document(entries))
        self._entries = entries
        return entry

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger to ``path`` atomically (temp file, fsync, rename, fsync dir)."""
        _atomic_write(Path(path), self._document(self._entries))

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
        return {**body, "sha256": _digest(body)}

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
        if doc.get("sha256") != _digest(body):
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
    ) -> PrivacyLedger:
        """Load the ledger at ``path``, or create it there (empty) if there is no file.

        An existing file must have the same scope, budget and accountant: a budget is never
        silently changed. Raises :class:`ConfigError` on a mismatch, :class:`CorruptLedgerError`
        for a bad file.
        """
        if Path(path).exists():
            ledger = cls.load(path)
            wanted = (scope, budget, parse_accountant(accountant))
            found = (ledger.scope, ledger.budget, ledger.accountant)
            if wanted != found:
                raise ConfigError(
                    f"ledger {str(path)!r} holds scope/budget/accountant {found}, "
                    f"but {wanted} was asked for"
                )
            return ledger
        ledger = cls(scope=scope, budget=budget, accountant=accountant, path=path)
        ledger.save(path)
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


def _digest(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _atomic_write(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` so that a reader sees the old file or the new, never a mix."""
    data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8")
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
