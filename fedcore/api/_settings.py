"""Settings from Python: keyword overrides, a dict of dotted keys, a TOML file.

The same schema, checks and errors as ``fedcore simulate --config FILE --set key=value``
(:func:`fedcore.config.resolve`): this module adds only the Python spelling. The runs take the
:class:`~fedcore.config.Settings` object itself (:mod:`fedcore.api.runs`), never its text.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedcore import config as cfg
from fedcore.config import Settings


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

    ``settings`` itself is frozen and left as it was. Raises :class:`~fedcore.errors.ConfigError`.
    """
    return cfg.resolve(values={**settings.to_dict(), **(values or {}), **overrides})
