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

# Imported as themselves (``X as X``): re-exported, each named in ``fedcore._API``.
from fedcore import _API
from fedcore.api._settings import override as override
from fedcore.api._settings import settings as settings
from fedcore.api.privacy import Budget as Budget
from fedcore.api.privacy import budget as budget
from fedcore.api.privacy import run_audit as run_audit
from fedcore.api.record import RunRecord as RunRecord
from fedcore.api.runs import ExperimentRecord as ExperimentRecord
from fedcore.api.runs import deploy_local as deploy_local
from fedcore.api.runs import model_reference as model_reference
from fedcore.api.runs import run_experiment as run_experiment
from fedcore.api.runs import simulate as simulate
from fedcore.config import Settings as Settings
from fedcore.errors import ConfigError as ConfigError
from fedcore.errors import FedcoreError as FedcoreError

__all__ = list(_API)  # the names are listed once, in fedcore/__init__.py
