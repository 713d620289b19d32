"""The machinery of a settings schema made of nested frozen dataclasses, apart from the schema.

One :class:`SettingSpec` per leaf field (dotted key, type, default, help, bounds in the field's
metadata); values are coerced to the field's type (:func:`coerce`), checked against its bounds
(:func:`check_bounds`) and built back into the dataclasses (:func:`build`). Nothing here knows
fedcore's settings: :mod:`fedcore.config` is the schema.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fedcore.errors import ConfigError

Scalar = bool | int | float | str


@dataclass(frozen=True, slots=True)
class SettingSpec:
    """One key of the schema."""

    key: str
    type: Any
    default: Scalar | None
    help: str
    meta: Mapping[str, Any]

    @property
    def optional(self) -> bool:
        return _is_optional(self.type)

    @property
    def choices(self) -> tuple[str, ...] | None:
        base = _strip_optional(self.type)
        return tuple(typing.get_args(base)) if typing.get_origin(base) is Literal else None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_group(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    if _is_optional(tp):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner
    return tp


def specs(cls: type, prefix: str = "") -> Iterable[SettingSpec]:
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_group(tp):
            yield from specs(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        yield SettingSpec(f"{prefix}{f.name}", tp, default, f.metadata.get("help", ""), f.metadata)


def flatten(obj: Any, prefix: str = "") -> Iterable[tuple[str, Scalar | None]]:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from flatten(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def coerce(spec: SettingSpec, value: Any, *, from_text: bool) -> Scalar | None:
    """Convert ``value`` to the setting's type; text from ``--set`` is parsed, other input is not."""
    base = _strip_optional(spec.type)
    if spec.optional and (value is None or value == "" or (from_text and value.lower() == "none")):
        return None
    choices = spec.choices
    try:
        if choices is not None:
            if value not in choices:
                raise ValueError
            return str(value)
        if base is bool:
            if isinstance(value, bool):
                return value
            if from_text and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            if from_text:
                return int(value)
            raise ValueError
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if (from_text or isinstance(value, int | float)) else None
            if number is None or not math.isfinite(number):
                raise ValueError
            return number
        if base is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"setting {spec.key!r} has an unsupported type {spec.type!r}")
    names = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}
    expected = f"one of {', '.join(choices)}" if choices else names.get(base, str(base))
    raise ConfigError(f"setting {spec.key!r} must be {expected}, got {value!r}")


def check_bounds(spec: SettingSpec, value: Scalar | None) -> None:
    if value is None or isinstance(value, str | bool):
        return
    meta = spec.meta
    for bound, ok in (
        ("min", lambda v, b: v >= b),
        ("ge", lambda v, b: v >= b),
        ("gt", lambda v, b: v > b),
        ("le", lambda v, b: v <= b),
        ("lt", lambda v, b: v < b),
    ):
        if bound in meta and not ok(value, meta[bound]):
            symbol = {"min": ">=", "ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[bound]
            raise ConfigError(f"setting {spec.key!r} must be {symbol} {meta[bound]}, got {value!r}")


def build(cls: type, values: Mapping[str, Scalar | None], prefix: str = "") -> Any:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if _is_group(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], values, f"{key}.")
        elif key in values:
            kwargs[f.name] = values[key]
    return cls(**kwargs)


def flatten_mapping(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (TOML tables become dotted keys)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten_mapping(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


