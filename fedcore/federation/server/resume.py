"""Which settings a run resumed from its record keeps, and which it may change
(:data:`RESUMABLE_CHANGES`): how it runs here, not what the federation computes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedcore.config import Settings
from fedcore.errors import ConfigError
from fedcore.protections import protections_of

# Settings a resumed run may change: how it runs here, not what the federation computes.
RESUMABLE_CHANGES = frozenset(
    {
        "round_timeout",
        "client_cpus",
        "client_gpus",
        "device",
        "max_failed_rounds",
        "secagg.timeout",
        "out",
        "resume",
        "rounds",
        "ray_address",
        "simulation.sites_per_node",
    }
)


def recorded_settings(out_dir: Path) -> Settings:
    """The settings in ``out_dir/config.json``; :class:`ConfigError` if there is no readable record."""
    from fedcore.config import resolve

    try:
        config = json.loads((out_dir / "config.json").read_text())
        values = config["settings"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{str(out_dir)!r} holds no run record to resume ({exc})") from exc
    return resolve(values={k: v for k, v in values.items() if k != "resume"})


def resume_settings(out_dir: Path, overrides: dict[str, Any]) -> Settings:
    """The settings of the record in ``out_dir`` with ``overrides`` (flat ``{key: value}``) applied,
    ``resume`` and ``out`` set. Raises :class:`ConfigError` for an override that would change what
    the federation computes, and for growing ``rounds`` when a noise multiplier is calibrated over
    the rounds."""
    from fedcore.config import resolve

    recorded = recorded_settings(out_dir)
    before = recorded.to_dict()
    changed = {k: v for k, v in overrides.items() if before.get(k) != v}
    refused = sorted(set(changed) - RESUMABLE_CHANGES)
    if refused:
        raise ConfigError(
            f"cannot resume with {', '.join(f'{k}={changed[k]!r}' for k in refused)}: it changes "
            f"what the federation computes (recorded: "
            f"{', '.join(f'{k}={before.get(k)!r}' for k in refused)}); start a new run instead"
        )
    if "rounds" in changed and protections_of(recorded).calibrated_over_rounds:
        raise ConfigError(
            "cannot resume with a different 'rounds': the DP noise multiplier was calibrated over "
            f"{recorded.rounds} rounds"
        )
    values = {k: v for k, v in before.items() if v is not None}
    values.update({k: v for k, v in overrides.items() if v is not None})
    values.update({"out": str(out_dir), "resume": True})
    return resolve(values=values)
