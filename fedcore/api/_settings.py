"""Settings from Python: keyword overrides, a dict of dotted keys, a TOML file.

The same schema, checks and errors as ``fedcore simulate --config FILE --set key=value``
(:func:`fedcore.config.resolve`): this module adds only the Python spelling, and the one
translation the command-line entries need, settings back to ``--set`` items.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedcore import config as cfg
from fedcore.config import Settings
from fedcore.errors import ConfigError


def settings(
    values: Mapping[str, Any] | None = None,
    /,
    *,
    file: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> Settings:
    """Settings from the defaults, then the TOML ``file``, then ``values``, then ``overrides``.

    Keys are the dotted setting keys of ``fedcore simulate --help-settings``; a key that is not a
    Python name goes in ``values`` or ``**{...}``::

        fedcore.settings(sites=3, rounds=5, **{"dp.site.epsilon": 2.0})
        fedcore.settings({"secagg.enabled": True}, file="federation.toml")

    Values are Python values (``2.0``, ``True``, ``None`` for an unset optional), not text.
    Raises :class:`~fedcore.errors.ConfigError` naming the key and the value: an unknown key (with
    the closest known one), a value of the wrong type or out of range, a rule between settings
    broken, an unreadable file.
    """
    merged = {**(values or {}), **overrides}
    return cfg.resolve(file=None if file is None else Path(file), values=merged)


def override(
    settings: Settings, values: Mapping[str, Any] | None = None, /, **overrides: Any
) -> Settings:
    """A copy of ``settings`` with some keys changed, checked as :func:`settings` checks::

        base = fedcore.settings(sites=3)
        private = fedcore.override(base, **{"dp.site.epsilon": 4.0})

    ``settings`` itself is frozen and left as it was. Raises :class:`ConfigError`.
    """
    return cfg.resolve(values={**settings.to_dict(), **(values or {}), **overrides})


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def as_overrides(settings: Settings) -> list[str]:
    """``settings`` as the ``--set key=value`` items that rebuild it from the defaults (only the
    keys that differ from them). Raises :class:`ConfigError` if the text would not give back the
    same settings (a string value with spaces at its ends, which ``--set`` strips)."""
    defaults = Settings().to_dict()
    items = [f"{k}={_text(v)}" for k, v in settings.to_dict().items() if v != defaults[k]]
    if cfg.resolve(overrides=items) != settings:
        raise ConfigError(
            "these settings cannot be passed on as `--set key=value` text unchanged "
            "(a string value with spaces at its start or end?)"
        )
    return items
