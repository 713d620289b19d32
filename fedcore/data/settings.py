"""What data a federation runs on and how it is split into sites: :class:`DataSettings`.

The settings are a frozen, hashable record, so loading can be cached per process on them
(:func:`fedcore.data.load_site` is called once per site and round by Flower's ClientApp).
Every field is checked when the record is made; whatever depends on the dataset itself (the number
of classes, the number of samples) is checked when it is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from fedcore.errors import ConfigError

__all__ = ["BUILTIN_DATASETS", "HUB_PREFIX", "DataSettings", "Partition"]

Partition = Literal["iid", "dirichlet", "pathological"]
"""How samples are dealt to sites (flwr-datasets partitioners of the same names)."""

BUILTIN_DATASETS: tuple[str, ...] = ("digits", "synthetic")
"""Dataset names that need no file: sklearn's bundled digits and the seeded generator."""

HUB_PREFIX = "hf:"
"""``dataset="hf:<name>"`` loads ``<name>`` through ``flwr_datasets.FederatedDataset``."""


@dataclass(frozen=True, slots=True)
class DataSettings:
    """The dataset and its split into sites, server holdout and per-site train/test.

    Attributes:
        dataset: ``"digits"`` (default, sklearn's 1,797 bundled 8x8 images), ``"synthetic"``
            (seeded Gaussian class clusters), a local path (``.npz`` with arrays ``x`` and
            ``y``; ``.csv``; ``.parquet``; a directory written by ``datasets``' ``save_to_disk``),
            or ``"hf:<name>"`` for a Hugging Face dataset through ``flwr_datasets``
            (``<name>`` may also be a local directory of data files).
        sites: number of sites (partitions), at least 1.
        partition: ``"iid"``, ``"dirichlet"`` (label skew, concentration ``alpha``) or
            ``"pathological"`` (each site holds ``classes_per_site`` classes).
        alpha: Dirichlet concentration, > 0; smaller is more skewed.
        classes_per_site: classes per site for ``"pathological"``, 1..number of classes.
        seed: seeds the holdout split, partitioning, per-site splits and the generator.
        label_column: the label column of CSV, Parquet and Hugging Face datasets.
        test_fraction: fraction of each site's samples kept as that site's test set, in (0, 1).
        holdout_fraction: fraction of the whole dataset kept by the server for central
            evaluation, in (0, 1). For ``hf:`` datasets with a ``test`` split, that split is the
            holdout and this fraction is not used.
        synthetic_samples, synthetic_features, synthetic_classes: size of the synthetic dataset.

    Raises:
        ConfigError: at construction, for a value of the wrong type or out of range; the message
            names the setting and the value given.
    """

    dataset: str = "digits"
    sites: int = 10
    partition: Partition = "iid"
    alpha: float = 0.5
    classes_per_site: int = 2
    seed: int = 0
    label_column: str = "label"
    test_fraction: float = 0.2
    holdout_fraction: float = 0.2
    synthetic_samples: int = 2000
    synthetic_features: int = 20
    synthetic_classes: int = 4

    def __post_init__(self) -> None:
        _require_str("dataset", self.dataset)
        if not self.dataset.strip():
            raise ConfigError(f"dataset must name a dataset, got {self.dataset!r}")
        _require_int("sites", self.sites, minimum=1)
        if self.partition not in get_args(Partition):
            raise ConfigError(
                f"partition must be one of {', '.join(get_args(Partition))}, got {self.partition!r}"
            )
        _require_float("alpha", self.alpha)
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha!r}")
        _require_int("classes_per_site", self.classes_per_site, minimum=1)
        _require_int("seed", self.seed, minimum=0)
        _require_str("label_column", self.label_column)
        for name in ("test_fraction", "holdout_fraction"):
            value = getattr(self, name)
            _require_float(name, value)
            if not 0 < value < 1:
                raise ConfigError(f"{name} must be in (0, 1), got {value!r}")
        _require_int("synthetic_samples", self.synthetic_samples, minimum=1)
        _require_int("synthetic_features", self.synthetic_features, minimum=1)
        _require_int("synthetic_classes", self.synthetic_classes, minimum=2)

    @property
    def is_hub(self) -> bool:
        """Whether the dataset is loaded through ``flwr_datasets.FederatedDataset``."""
        return self.dataset.startswith(HUB_PREFIX)


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value!r}")


def _require_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value!r}")


def _require_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
