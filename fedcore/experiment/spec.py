"""An experiment spec: a base configuration and the axes to sweep, read from TOML.

    [experiment]                      # optional: a name and a one-line description
    name = "mode_comparison"

    [base]                            # any `fedcore simulate` setting (tables become dotted keys)
    rounds = 10
    batch_size = 64

    [axes]                            # lists; every combination is one point
    mode = ["none", "record", "site", "site-secagg"]
    epsilon = [1, 2, 4, 8]            # goes to the budget of the point's mode
    seed = [0, 1, 2]                  # any other key is a setting
    audit = true                      # optional: audit every record-level point (fedcore audit)

    [modes.record]                    # optional: settings for one mode only (an unfair comparison,
    lr = 2.0                          # which the summary lists as a difference between points)

    [quick]                           # optional: what `--quick` changes; settings, and
    rounds = 3                        # [quick.axes] replaces whole axes
    [quick.axes]
    seed = [0]

``mode`` and ``epsilon`` are the privacy axes: ``none`` trains without DP (and takes no epsilon),
``record`` sets ``dp.site.epsilon`` (DP-SGD at every site), ``site`` sets ``dp.server.epsilon``
(DP-FedAvg at a trusted server), ``site-secagg`` sets ``dp.server.epsilon`` and
``secagg.enabled = true`` (DP-FedAvg on the securely aggregated sum), ``distributed`` sets
``dp.distributed.epsilon`` and ``secagg.enabled = true`` (distributed DP: each site adds discrete
noise before masking, so the sum is private against the server too; the mechanism, ring bits and
the rest are ordinary ``dp.distributed.*`` settings, axes or ``[modes.distributed]``). ``audit = true`` in
``[axes]`` is not an axis but a switch: every ``record`` point is also audited with
``fedcore audit`` (``[experiment] audit_canaries`` canaries, default that command's). Fair
comparisons are the default: every mode gets the same training settings unless ``[modes.<mode>]`` says otherwise.

Everything is checked here, before any run starts: unknown keys, bad values (through
:func:`fedcore.config.resolve`), a privacy key set both by a mode and by hand. Errors are
:class:`~fedcore.errors.ConfigError`.
"""

from __future__ import annotations

import enum
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore import config as cfg
from fedcore.errors import ConfigError

Scalar = bool | int | float | str

MODE_AXIS = "mode"
EPSILON_AXIS = "epsilon"
AUDIT_AXIS = "audit"


class Mode(enum.Enum):
    NONE = "none"
    RECORD = "record"
    SITE = "site"
    SITE_SECAGG = "site-secagg"
    DISTRIBUTED = "distributed"

    @property
    def private(self) -> bool:
        return self is not Mode.NONE


# The settings each mode owns; a spec may not set them by hand while a mode axis is present.
PRIVACY_KEYS = ("dp.site.epsilon", "dp.server.epsilon", "dp.distributed.epsilon", "secagg.enabled")


def mode_settings(mode: Mode, epsilon: float | None) -> dict[str, Scalar]:
    """The settings that put a run in ``mode`` with budget ``epsilon``. Raises ConfigError."""
    if mode is Mode.NONE:
        return {}
    if epsilon is None:
        raise ConfigError(f"mode {mode.value!r} needs an epsilon (an 'epsilon' axis)")
    if mode is Mode.RECORD:
        return {"dp.site.epsilon": epsilon}
    if mode is Mode.SITE:
        return {"dp.server.epsilon": epsilon}
    if mode is Mode.SITE_SECAGG:
        return {"dp.server.epsilon": epsilon, "secagg.enabled": True}
    return {"dp.distributed.epsilon": epsilon, "secagg.enabled": True}


def parse_mode(value: Any) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        choices = ", ".join(m.value for m in Mode)
        raise ConfigError(f"axis 'mode' takes {choices}; got {value!r}") from None


@dataclass(frozen=True, slots=True)
class ExperimentSpec:
    """A parsed spec. ``axes`` keeps the spec's order; ``mode`` values are :class:`Mode`."""

    name: str
    description: str
    base: Mapping[str, Scalar]
    axes: tuple[tuple[str, tuple[Any, ...]], ...]
    per_mode: Mapping[Mode, Mapping[str, Scalar]]
    quick: bool
    audit: bool = False
    audit_canaries: int | None = None

    def axis(self, name: str) -> tuple[Any, ...] | None:
        return dict(self.axes).get(name)


def load_spec(path: str | Path, *, quick: bool = False) -> ExperimentSpec:
    """Read and check the spec at ``path``; ``quick`` applies its ``[quick]`` table."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"experiment spec {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"experiment spec {str(path)!r} could not be read: {exc}") from exc
    return parse_spec(text, quick=quick, default_name=path.stem)


def parse_spec(
    text: str, *, quick: bool = False, default_name: str = "experiment"
) -> ExperimentSpec:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"experiment spec is not valid TOML: {exc}") from exc
    unknown = set(doc) - {"experiment", "base", "axes", "modes", "quick"}
    if unknown:
        raise ConfigError(
            f"experiment spec has unknown table(s) {sorted(unknown)}; "
            "expected [experiment], [base], [axes], [modes.<mode>], [quick]"
        )
    meta = _table(doc, "experiment")
    base = _settings(_table(doc, "base"), where="[base]")
    raw_axes = dict(_table(doc, "axes"))
    audit = _audit_switch(raw_axes.pop(AUDIT_AXIS, False))
    canaries = meta.get("audit_canaries")
    if canaries is not None and (
        isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 2
    ):
        raise ConfigError(f"[experiment] audit_canaries must be an integer >= 2, got {canaries!r}")
    if quick:
        quick_table = doc.get("quick")
        if not isinstance(quick_table, dict):
            raise ConfigError("--quick needs a [quick] table in the spec, and it has none")
        quick_axes = quick_table.get("axes", {})
        if not isinstance(quick_axes, dict):
            raise ConfigError("[quick.axes] must be a table of lists")
        base = {
            **base,
            **_settings({k: v for k, v in quick_table.items() if k != "axes"}, where="[quick]"),
        }
        for name, values in quick_axes.items():
            if name not in raw_axes:
                raise ConfigError(f"[quick.axes] names {name!r}, which is not an axis of [axes]")
            raw_axes[name] = values
    axes = tuple((name, _axis(name, values)) for name, values in raw_axes.items())
    per_mode: dict[Mode, Mapping[str, Scalar]] = {}
    for name, table in _table(doc, "modes").items():
        if not isinstance(table, dict):
            raise ConfigError(f"[modes] holds one table per mode, got {name} = {table!r}")
        per_mode[parse_mode(name)] = _settings(table, where=f"[modes.{name}]")
    spec = ExperimentSpec(
        name=str(meta.get("name", default_name)),
        description=str(meta.get("description", "")),
        base=base,
        axes=axes,
        per_mode=per_mode,
        quick=quick,
        audit=audit,
        audit_canaries=canaries,
    )
    _check_privacy_axes(spec)
    return spec


def _table(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    table = doc.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table, got {table!r}")
    return table


def _settings(table: Mapping[str, Any], *, where: str) -> dict[str, Scalar]:
    flat = cfg.flatten_mapping(table)
    for key, value in flat.items():
        if key not in cfg.SPECS:
            raise ConfigError(f"{where}: unknown setting {key!r}")
        cfg.resolve(values={key: value})  # raises ConfigError naming key and value
    return flat


def _axis(name: str, values: Any) -> tuple[Any, ...]:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"axis {name!r} must be a non-empty list, got {values!r}")
    if len(set(map(repr, values))) != len(values):
        raise ConfigError(f"axis {name!r} repeats a value: {values!r}")
    if name == MODE_AXIS:
        return tuple(parse_mode(v) for v in values)
    if name == EPSILON_AXIS:
        for v in values:
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not (math.isfinite(v) and v > 0)
            ):
                raise ConfigError(f"axis 'epsilon' takes finite numbers > 0, got {v!r}")
        return tuple(float(v) for v in values)
    if name not in cfg.SPECS:
        raise ConfigError(f"axis {name!r} is neither 'mode', 'epsilon' nor a setting")
    for v in values:
        cfg.resolve(values={name: v})
    return tuple(values)


def _audit_switch(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    if len(values) != 1 or not isinstance(values[0], bool):
        raise ConfigError(
            f"'audit' in [axes] is a switch: true or false (or [true]), got {value!r}"
        )
    return values[0]


def _check_privacy_axes(spec: ExperimentSpec) -> None:
    modes = spec.axis(MODE_AXIS)
    if spec.axis(EPSILON_AXIS) is not None and modes is None:
        raise ConfigError("axis 'epsilon' needs an axis 'mode' saying whose budget it is")
    if modes is None:
        if spec.audit:
            raise ConfigError("'audit = true' needs a 'mode' axis with 'record'")
        return
    for key in PRIVACY_KEYS:
        owners = ["[base]"] if key in spec.base else []
        owners += [f"[modes.{m.value}]" for m, s in spec.per_mode.items() if key in s]
        owners += ["[axes]"] if spec.axis(key) is not None else []
        if owners:
            raise ConfigError(
                f"setting {key!r} is chosen by the 'mode' axis; remove it from {', '.join(owners)}"
            )
    if any(m.private for m in modes) and spec.axis(EPSILON_AXIS) is None:
        raise ConfigError("a private mode needs an 'epsilon' axis (the budget of that mode)")
    if spec.audit and Mode.RECORD not in modes:
        raise ConfigError(
            "'audit = true' audits record-level DP, and the 'mode' axis has no 'record'"
        )
