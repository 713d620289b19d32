"""Flower's heartbeat timings for the hosts test's site hosts (on ``PYTHONPATH`` there only).

Flower 1.41 has no option for them. Python imports ``sitecustomize`` at start-up; this one puts an
import hook in place that, once a Flower module below has run, sets its ``HEARTBEAT_DEFAULT_INTERVAL``
(which each imported by value from ``flwr.common.constant``):

- ``FEDCORE_TEST_HEARTBEAT_INTERVAL``: the SuperNode's own heartbeat (30 s by default): the
  interval it announces when it activates and in every heartbeat, and how often it beats
  (``flwr.supernode.fleet_http_connection``, ``flwr.supercore.heartbeat``). The SuperLink counts
  a node online until it misses two (``HEARTBEAT_PATIENCE``), so a SuperNode killed and started
  again is refused activation for about 2 x 30 s, and a silent node is answered for ("Node
  Unavailable") only then. The SuperLink accepts 10 s to 30 min.
- ``FEDCORE_TEST_TASK_INTERVAL``: how long the SuperNode gives a ``flwr-clientapp`` it starts to
  report in (its task token lives ``interval`` s from the claim, then ``2 x interval`` s from each
  heartbeat: ``flwr.supercore.corestate``). On a machine at load 10, a ClientApp that imports
  torch can take longer than 30 s; its token has then expired and every call it makes is refused
  ("Runtime task-token authentication failed", HTTP 401): the site never answers.
"""

import importlib.abc
import importlib.machinery
import os
import sys

_NODE = ("flwr.supernode.fleet_http_connection", "flwr.supercore.heartbeat")
_TASK = ("flwr.supercore.corestate.in_memory_corestate", "flwr.supercore.corestate.sql_corestate")


def _intervals() -> dict[str, int]:
    values: dict[str, int] = {}
    for modules, variable in ((_NODE, "FEDCORE_TEST_HEARTBEAT_INTERVAL"), (_TASK, "FEDCORE_TEST_TASK_INTERVAL")):  # fmt: skip
        if value := os.environ.get(variable):
            values.update(dict.fromkeys(modules, int(value)))
    return values


class _SetInterval(importlib.abc.MetaPathFinder):
    """Finds the modules above as usual, and sets the interval once each has run."""

    def __init__(self, intervals: dict[str, int]):
        self.intervals = intervals

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201 - importlib's signature
        if name not in self.intervals:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        run, interval = spec.loader.exec_module, self.intervals[name]

        def exec_module(module):  # noqa: ANN001, ANN202
            run(module)
            module.HEARTBEAT_DEFAULT_INTERVAL = interval

        spec.loader.exec_module = exec_module
        return spec


if _INTERVALS := _intervals():
    sys.meta_path.insert(0, _SetInterval(_INTERVALS))
