"""Which data a node trains on: the site's partition, named by the node's config.

In simulation and in deployment alike a node's config carries ``partition-id`` (and Flower's
simulation adds ``num-partitions``): the site trains on that partition of the run's dataset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedcore.config import Settings
from fedcore.data import DataSettings, SiteData, load_site
from fedcore.errors import ConfigError


def data_settings(settings: Settings) -> DataSettings:
    """The data half of the settings, as :mod:`fedcore.data` takes it."""
    return DataSettings(
        dataset=settings.dataset,
        sites=settings.sites,
        partition=settings.partition,
        alpha=settings.alpha,
        classes_per_site=settings.classes_per_site,
        seed=settings.seed,
        label_column=settings.label_column,
        test_fraction=settings.test_fraction,
        holdout_fraction=settings.holdout_fraction,
        synthetic_samples=settings.synthetic.samples,
        synthetic_features=settings.synthetic.features,
        synthetic_classes=settings.synthetic.classes,
    )


def site_data(settings: Settings, node_config: Mapping[str, Any]) -> SiteData:
    """The site's data. Raises :class:`ConfigError` for a node config without a usable partition."""
    raw = node_config.get("partition-id")
    try:
        site_id = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"node config needs an integer 'partition-id', got {dict(node_config)}") from exc
    return load_site(data_settings(settings), site_id)
