"""DP-FedAvg with the Gaussian added at a trusted server (McMahan et al., ICLR 2018, Alg. 1).

Site half: nothing; the site sends its update as it is (the server clips it). Server half: clip
each received update to L2 norm ``C``, sum, add Gaussian noise of standard deviation ``z C`` from a
CSPRNG, divide by the expected number of sites ``q n``
(:func:`fedcore.privacy.dpfedavg.dp_fedavg_round`, which charges the ledger before releasing).
The Flower round that runs it is :mod:`fedcore.federation.server.dp_round`.

Against whom: observers of the released models (the server itself sees every update: no
guarantee against it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedcore.mechanisms.base import SiteLevelDP


@dataclass(frozen=True, slots=True, kw_only=True)
class CentralGaussian(SiteLevelDP):
    """Site-level DP at a trusted server, on the individually received updates."""

    name: ClassVar[str] = "central-gaussian"
    on_secagg: ClassVar[bool] = False

    @property
    def title(self) -> str:
        return "DP-FedAvg, Gaussian noise at a trusted server"
