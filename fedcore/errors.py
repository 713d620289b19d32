"""The one exception hierarchy of fedcore.

Every failure the library raises on purpose derives from :class:`FedcoreError`, so a caller can
catch all of them in one clause::

    FedcoreError
    ├── ProtocolError            (never raised directly)
    │   ├── LocalProtocolError   the caller used the API wrongly
    │   └── RemoteProtocolError  a peer sent something illegal
    │       └── ImplausibleSumError  a decoded aggregate no honest sites could produce
    ├── InvalidMessage           any failure to decrypt, authenticate or parse
    ├── ConfigError              a bad setting, named with the value that was given
    │   └── LedgerLostError      a ledger is missing or older than what its scope released
    └── BudgetExceededError      a privacy charge that would pass the budget

Input from a peer never surfaces as a bare ``KeyError``, ``TypeError``, ``IndexError`` or
``assert``: it is turned into one of these, with a message that says what was expected and what
arrived.
"""

from __future__ import annotations


class FedcoreError(Exception):
    """Base class of every error fedcore raises on purpose."""


class ProtocolError(FedcoreError):
    """A protocol rule was broken. Never raised directly: see the two subclasses."""


class LocalProtocolError(ProtocolError):
    """The caller used a protocol object wrongly (wrong state, wrong argument)."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something the protocol does not allow."""


class InvalidMessage(FedcoreError):
    """Bytes could not be decrypted, authenticated or parsed."""


class ConfigError(FedcoreError):
    """A setting has a bad value; the message names the setting and the value given."""


class BudgetExceededError(FedcoreError):
    """A privacy charge would take a ledger past its budget; nothing was charged."""


class ImplausibleSumError(RemoteProtocolError):
    """A decoded aggregate cannot be the sum of honest contributions (under DP: its norm passes
    contributors x clip norm); the round is discarded with this reason, nothing is released."""


class LedgerLostError(ConfigError):
    """A privacy ledger is missing, or older than what its scope has released; nothing is released
    until an operator resets it (``fedcore ledger reset``), which the ledger records."""


class CorruptJournalError(ConfigError):
    """A site's secure-aggregation round journal is missing beside its key, or damaged; the site
    refuses to take part rather than forget which rounds it already answered (file left as is)."""


class RecordInUseError(ConfigError):
    """Another process is writing this run record (a run still going on, or the server of one that
    was killed and has not yet exited); nothing in the record was touched."""


class UnsupportedModel(FedcoreError):
    """The model has a layer or a usage fedcore's fused DP-SGD clipper does not handle; internal:
    DP-SGD then falls back to Opacus (:func:`fedcore.privacy.dpsgd._resolve_mode`)."""
