"""Differential privacy in fedcore: events, accountant, ledger, and the two mechanisms.

- :mod:`~fedcore.privacy.events`: frozen records of what a mechanism released.
- :mod:`~fedcore.privacy.accountant`: epsilon of a history of events; noise calibration.
- :mod:`~fedcore.privacy.ledger`: an append-only, budgeted, durable history per scope.
- :mod:`~fedcore.privacy.transforms`: small pure transforms (clip, noise, noisy count).
- :mod:`~fedcore.privacy.dpfedavg`: site-level DP at the server (DP-FedAvg, adaptive clipping).
- :mod:`~fedcore.privacy.dpsgd`: record-level DP-SGD at a site (imports torch and Opacus, so it
  is not imported here; ``from fedcore.privacy.dpsgd import train_dp_sgd``).
"""

from fedcore.privacy.accountant import (
    AccountantKind,
    calibrate_noise_multiplier,
    epsilon,
)
from fedcore.privacy.events import (
    ComposedEvent,
    FixedSizeSubsampledGaussian,
    GaussianEvent,
    NonPrivate,
    NoPrivacyLoss,
    PoissonSubsampledGaussian,
    PrivacyEvent,
    SelfComposedEvent,
    UnsupportedEventError,
)
from fedcore.privacy.ledger import (
    Budget,
    CorruptLedgerError,
    LedgerEntry,
    PrivacyLedger,
    Scope,
    ScopeKind,
)

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
    "Scope",
    "ScopeKind",
    "SelfComposedEvent",
    "UnsupportedEventError",
    "calibrate_noise_multiplier",
    "epsilon",
]
