"""fedcore's Python API: what the ``fedcore`` commands do, in a few lines of Python.

::

    import fedcore

    settings = fedcore.settings(sites=5, rounds=10, **{"dp.site.epsilon": 4.0})
    record = fedcore.simulate(settings, out="runs/private")
    print(record.final_accuracy, record.record_epsilon)

- :func:`settings`, :func:`override`: :class:`~fedcore.config.Settings` from keywords, a dict of
  dotted keys or a TOML file, checked as ``--set`` is (:mod:`fedcore.api._settings`);
- :func:`simulate`, :func:`deploy_local`, :func:`run_experiment`: the runs
  (:mod:`fedcore.api.runs`), returning a :class:`RunRecord` (:mod:`fedcore.api.record`) or an
  :class:`ExperimentRecord`;
- :func:`budget`, :func:`run_audit`: the privacy arithmetic and the empirical audit
  (:mod:`fedcore.api.privacy`).

Every name here is also ``fedcore.<name>``, imported on first use, so ``import fedcore`` stays
light. ``docs/python-api.md`` is the reference with an example each; ``examples/`` holds scripts.
"""

from fedcore.api._settings import override, settings
from fedcore.api.privacy import Budget, budget, run_audit
from fedcore.api.record import RunRecord
from fedcore.api.runs import (
    ExperimentRecord,
    deploy_local,
    model_reference,
    run_experiment,
    simulate,
)
from fedcore.config import Settings
from fedcore.errors import ConfigError, FedcoreError

__all__ = [
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
]
