"""Every combination of a spec's axes, as the settings of one ``fedcore simulate`` run each.

A point's settings are, in order: the spec's ``[base]``, the point's non-privacy axis values, the
settings of its mode (:func:`~fedcore.experiment.spec.mode_settings`), then ``[modes.<mode>]``.
A ``none`` point ignores the epsilon axis, so it appears once per combination of the other axes;
likewise a point of any mode but ``distributed`` ignores the ``dp.distributed.*`` axes (the
distributed mechanism, its ring bits), so a central baseline appears once beside them.
Each point's settings are resolved with :func:`fedcore.config.resolve` and its protections with
:func:`fedcore.protections.protections_of` here, so a combination that fedcore refuses (for
example secure aggregation with one site) fails before anything runs.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedcore import config as cfg
from fedcore.experiment.spec import (
    EPSILON_AXIS,
    MODE_AXIS,
    ExperimentSpec,
    Mode,
    Scalar,
    mode_settings,
)
from fedcore.protections import protections_of

SEED_AXIS = "seed"
DISTRIBUTED_PREFIX = "dp.distributed."  # axes only a distributed point takes


@dataclass(frozen=True, slots=True)
class Point:
    """One run. ``swept`` holds the value of every axis (None where the point ignores it: ``epsilon``
    for mode none, ``dp.distributed.*`` for modes other than distributed)."""

    run_id: str
    swept: Mapping[str, Any]
    settings: Mapping[str, Scalar]

    @property
    def mode(self) -> Mode | None:
        return self.swept.get(MODE_AXIS)

    @property
    def has_dp(self) -> bool:
        """Whether the point trains with DP of any kind (record-level, site-level, or both)."""
        return protections_of(cfg.resolve(values=self.settings)).any_dp

    def overrides(self) -> list[str]:
        """The settings as ``fedcore simulate --set key=value`` items."""
        return [f"{key}={to_text(value)}" for key, value in self.settings.items()]

    def group_key(self) -> tuple[tuple[str, str], ...]:
        """The point without its seed: the runs averaged together in the summary."""
        return tuple((k, display(v)) for k, v in self.swept.items() if k != SEED_AXIS)


def to_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def display(value: Any) -> str:
    """How a swept value is written in file names, results.csv and the summary."""
    if value is None:
        return ""
    if isinstance(value, Mode):
        return value.value
    if isinstance(value, float):
        return f"{value:g}"
    return to_text(value)


def plan(spec: ExperimentSpec) -> list[Point]:
    """The points of ``spec`` in a stable order (the axes' order, first axis slowest)."""
    names = [name for name, _ in spec.axes]
    points: list[Point] = []
    seen: set[str] = set()
    for combo in itertools.product(*(values for _, values in spec.axes)):
        swept: dict[str, Any] = dict(zip(names, combo, strict=True))
        mode: Mode | None = swept.get(MODE_AXIS)
        if mode is Mode.NONE and EPSILON_AXIS in swept:
            swept[EPSILON_AXIS] = None
        if mode is not None and mode is not Mode.DISTRIBUTED:
            swept.update({k: None for k in swept if k.startswith(DISTRIBUTED_PREFIX)})
        settings: dict[str, Scalar] = dict(spec.base)
        settings.update(
            {k: v for k, v in swept.items() if k not in (MODE_AXIS, EPSILON_AXIS) and v is not None}
        )
        if mode is not None:
            settings.update(mode_settings(mode, swept.get(EPSILON_AXIS)))
            settings.update(spec.per_mode.get(mode, {}))
        run_id = _run_id(swept)
        if run_id in seen:
            continue
        seen.add(run_id)
        # Raises ConfigError for a combination fedcore refuses (a setting, or between protections).
        protections_of(cfg.resolve(values=settings))
        points.append(Point(run_id=run_id, swept=swept, settings=settings))
    return points


def _run_id(swept: Mapping[str, Any]) -> str:
    parts = []
    for key, value in swept.items():
        if value is None:
            continue
        text = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{key}-{display(value)}")
        parts.append(text)
    return "_".join(parts) or "run"


def resolved_settings(point: Point) -> dict[str, Any]:
    """Every setting of ``point`` after defaults (for the summary's list of differences)."""
    return cfg.resolve(values=point.settings).to_dict()
