"""fedcore: privacy-preserving federated learning for data-center sites, on Flower.

Record-level DP-SGD at each site (Opacus), secure aggregation (SecAgg+), and site-level DP on the
aggregate, all accounted in one privacy ledger.

The Python API (:mod:`fedcore.api`, ``docs/python-api.md``) is available here by name::

    import fedcore

    record = fedcore.simulate(fedcore.settings(sites=3, rounds=5), out="runs/first")

Its names are imported on first use (module ``__getattr__``, PEP 562), so ``import fedcore``, which
every deployed site and every ``fedcore`` command does, imports nothing else.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# The API's names, listed here only: fedcore.api's ``__all__`` is this tuple (it cannot be read
# from there without importing the API). ``fedcore.experiment`` and ``fedcore.audit`` are
# subpackages, so their runs are ``run_experiment`` and ``run_audit``.
_API = (
    "Budget",
    "ConfigError",
    "ExperimentRecord",
    "FedcoreError",
    "RunRecord",
    "Settings",
    "budget",
    "deploy_local",
    "model_reference",
    "override",
    "run_audit",
    "run_experiment",
    "settings",
    "simulate",
)

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from fedcore import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedcore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
