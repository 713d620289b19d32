"""Differential privacy in fedcore: events, accountant, ledger, and the two mechanisms.

- :mod:`~fedcore.privacy.events`: frozen records of what a mechanism released.
- :mod:`~fedcore.privacy.accountant`: epsilon of a history of events; noise calibration.
- :mod:`~fedcore.privacy.ledger`: an append-only, budgeted, durable history per scope (its scope
  and budget: :mod:`~fedcore.privacy.scope`; its files: :mod:`~fedcore.privacy.ledger_files`).
- :mod:`~fedcore.privacy.transforms`: small pure transforms (clip, noise, noisy count).
- :mod:`~fedcore.privacy.dpfedavg`: site-level DP at the server (DP-FedAvg, adaptive clipping).
- :mod:`~fedcore.privacy.sample_known`: the site-level epsilon against observers who know the
  sample, under the relations of :mod:`~fedcore.privacy.relations`.
- :mod:`~fedcore.privacy.discrete_charge`: what the discrete Gaussian costs beside its charge.
- :mod:`~fedcore.privacy.dpsgd`: record-level DP-SGD at a site (imports torch and Opacus, so it
  is not imported here; ``from fedcore.privacy.dpsgd import train_dp_sgd``).

The names below are loaded on first use (PEP 562), so importing a light module of the package
(:mod:`~fedcore.privacy.relations`, :mod:`~fedcore.privacy.events`) does not load dp-accounting:
a deployed site resolves its protections in every fresh ClientApp process.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedcore.privacy.accountant import AccountantKind, calibrate_noise_multiplier, epsilon
    from fedcore.privacy.events import (
        ComposedEvent,
        FixedSizeSubsampledGaussian,
        GaussianEvent,
        NonPrivate,
        NoPrivacyLoss,
        PoissonSubsampledGaussian,
        PrivacyEvent,
        RevealedWithProbability,
        SelfComposedEvent,
        UnsupportedEventError,
    )
    from fedcore.privacy.ledger import LedgerEntry, PrivacyLedger
    from fedcore.privacy.ledger_files import CorruptLedgerError
    from fedcore.privacy.relations import SiteRelation
    from fedcore.privacy.scope import Budget, Scope, ScopeKind

_HOME = {
    "AccountantKind": "accountant",
    "calibrate_noise_multiplier": "accountant",
    "epsilon": "accountant",
    "ComposedEvent": "events",
    "FixedSizeSubsampledGaussian": "events",
    "GaussianEvent": "events",
    "NonPrivate": "events",
    "NoPrivacyLoss": "events",
    "PoissonSubsampledGaussian": "events",
    "PrivacyEvent": "events",
    "RevealedWithProbability": "events",
    "SelfComposedEvent": "events",
    "UnsupportedEventError": "events",
    "LedgerEntry": "ledger",
    "PrivacyLedger": "ledger",
    "CorruptLedgerError": "ledger_files",
    "SiteRelation": "relations",
    "Budget": "scope",
    "Scope": "scope",
    "ScopeKind": "scope",
}

__all__ = [
    "AccountantKind",
    "Budget",
    "ComposedEvent",
    "CorruptLedgerError",
    "FixedSizeSubsampledGaussian",
    "GaussianEvent",
    "LedgerEntry",
    "NoPrivacyLoss",
    "NonPrivate",
    "PoissonSubsampledGaussian",
    "PrivacyEvent",
    "PrivacyLedger",
    "RevealedWithProbability",
    "Scope",
    "ScopeKind",
    "SelfComposedEvent",
    "SiteRelation",
    "UnsupportedEventError",
    "calibrate_noise_multiplier",
    "epsilon",
]


def __getattr__(name: str) -> Any:
    """Load ``name`` from the module that defines it, on first use."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'fedcore.privacy' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fedcore.privacy.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
