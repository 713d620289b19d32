"""The neighbouring relations a site-level epsilon can hold for, each named once.

A differential-privacy epsilon is a statement about two neighbouring federations; which pairs are
neighbours decides what the number protects. For one whole site:

- :attr:`SiteRelation.ADD_REMOVE`: the site is in the federation or it is not. DP-FedAvg's
  ``server_epsilon`` holds for it against observers who do not know which sites were sampled
  (amplification by Poisson sampling hides whether the site exists).
- :attr:`SiteRelation.ZERO_OUT`: the site takes part and contributes nothing (a zero update)
  instead of its update. An observer who knows the sample can tell whether a site exists, so the
  sample-known epsilon with sensitivity ``C`` holds only for this relation.
- :attr:`SiteRelation.REPLACE_ONE`: the site's update is replaced by any other; the two sums differ
  by up to ``2C`` (sensitivity ``2C``: the Gaussian with the noise multiplier halved).

The values are the wording the run record (``privacy.json``) and ``summary.md`` print. Imports
nothing: a deployed site resolves its protections in every fresh ClientApp process.
"""

from __future__ import annotations

import enum


class SiteRelation(enum.Enum):
    """Which pairs of federations a site-level epsilon compares; the value is its wording."""

    ADD_REMOVE = "add or remove one whole site"
    ZERO_OUT = "zero-out one whole site (it takes part and contributes nothing)"
    REPLACE_ONE = "replace one whole site's update by another (sensitivity 2C)"

    @property
    def sensitivity_factor(self) -> float:
        """How many times the clip norm ``C`` one site can move the sum under this relation."""
        return 2.0 if self is SiteRelation.REPLACE_ONE else 1.0
