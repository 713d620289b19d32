"""Whose privacy a ledger accounts for (:class:`Scope`), and how much it may spend (:class:`Budget`).

A *scope* is one unit of privacy with one ledger: one site's training records (record-level DP-SGD,
the unit is one record of that site) or the federation's sites (site-level DP-FedAvg, the unit is
one whole site). A *budget* is the total (epsilon, delta) the scope may spend, over every run that
charges its ledger (:mod:`fedcore.privacy.ledger`).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from fedcore.errors import ConfigError
from fedcore.privacy.accountant import check_delta


class ScopeKind(enum.Enum):
    """Whose privacy a ledger accounts for."""

    SITE_RECORDS = "site_records"  # one site's records (record-level DP-SGD)
    FEDERATION_SITES = "federation_sites"  # whole sites, at the server (DP-FedAvg)
    SITE_AGAINST_SERVER = (
        "site_against_server"  # one whole site, against the server (distributed DP)
    )


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
