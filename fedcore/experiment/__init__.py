"""Privacy-budget experiments: a TOML spec of axes, one ``fedcore simulate`` run per point.

- :mod:`fedcore.experiment.spec`: the spec format and the privacy modes;
- :mod:`fedcore.experiment.plan`: every combination of the axes, as settings;
- :mod:`fedcore.experiment.runner`: the runs, N at a time, resumable;
- :mod:`fedcore.experiment.results`: ``results.csv`` and ``summary.md``;
- :mod:`fedcore.experiment.plots`: the plots.

``fedcore experiment SPEC.toml`` (:mod:`fedcore.cli.experiment`) puts them together.
"""

from fedcore.experiment.plan import Point, plan
from fedcore.experiment.spec import ExperimentSpec, Mode, load_spec, parse_spec

__all__ = ["ExperimentSpec", "Mode", "Point", "load_spec", "parse_spec", "plan"]
