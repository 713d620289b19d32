"""Site-level DP mechanisms, one object each, with a site half and a server half.

- :mod:`~fedcore.mechanisms.base`: what every mechanism shares (parameters, ledger, events,
  the neighbouring relations by name).
- :mod:`~fedcore.mechanisms.central`: DP-FedAvg, Gaussian noise at a trusted server.
- :mod:`~fedcore.mechanisms.central_on_secagg`: the same Gaussian on the securely aggregated sum.

A new mechanism is a new module here and a new case of :func:`fedcore.protections.mechanism_for`; the server round,
the site, the ledger and the run record treat every mechanism alike.
"""

from __future__ import annotations

from fedcore.mechanisms.base import BudgetAgainst, Clip, SiteLevelDP
from fedcore.mechanisms.central import CentralGaussian

Mechanism = SiteLevelDP

__all__ = ["BudgetAgainst", "CentralGaussian", "Clip", "Mechanism", "SiteLevelDP"]
