"""Dealing samples to sites with flwr-datasets partitioners, and splitting each site.

Theory of operation. A federation is made in three seeded steps, each from its own random stream
(``numpy.random.default_rng([seed, stream])``), so that changing one step never shifts another:

1. *Holdout.* A uniformly random ``holdout_fraction`` of all samples goes to the server for central
   evaluation (:func:`split_holdout`). No site ever sees these samples.
2. *Partitioning.* The remaining samples are dealt to sites by a flwr-datasets partitioner
   (:func:`make_partitioner`): ``IidPartitioner`` (after a seeded shuffle, equal shards),
   ``DirichletPartitioner`` (per class, proportions drawn from Dir(alpha); Hsu et al. 2019,
   "Measuring the effects of non-identical data distribution", section 3) or
   ``PathologicalPartitioner`` (each site holds ``classes_per_site`` classes; McMahan et al. 2017,
   "Communication-efficient learning of deep networks from decentralized data", section 3). The
   partitioner runs on a ``datasets.Dataset`` of just two columns, the sample's index and its label,
   so features never pass through Arrow (:func:`partition_indices`).
3. *Site split.* Each site's samples are split into train and test (:func:`split_site`), with at
   least one sample in each.

Guarantees: for ``iid`` and ``dirichlet`` every sample is in exactly one of holdout, a site's train
or a site's test. For ``pathological`` the same holds except that samples of a class assigned to no
site (possible when ``sites * classes_per_site`` is below the number of classes) are in none.
Every site has at least :data:`MIN_SITE_SAMPLES` samples, or loading fails with ``ConfigError``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from fedcore.data.arrays import one_line
from fedcore.data.settings import DataSettings
from fedcore.errors import ConfigError

__all__ = [
    "MIN_SITE_SAMPLES",
    "check_classes_per_site",
    "check_site_size",
    "make_partitioner",
    "partition_indices",
    "run_partitioner",
    "split_holdout",
    "split_site",
]

MIN_SITE_SAMPLES = 2
"""A site needs one training and one test sample."""

_HOLDOUT_STREAM = 1
_SITE_SPLIT_STREAM = 2

_T = TypeVar("_T")


def split_holdout(num_samples: int, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(holdout, rest)``: disjoint int64 index arrays covering ``range(num_samples)``.

    ``holdout`` holds ``round(fraction * num_samples)`` indices, at least one, and ``rest`` at least
    one; ``rest`` is in random order (seeded), which is what ``IidPartitioner`` needs.

    Raises:
        ConfigError: if ``num_samples < 2``.
    """
    if num_samples < 2:
        raise ConfigError(
            f"the dataset has {num_samples} sample(s); the holdout and the sites need at least 2"
        )
    size = min(max(1, round(fraction * num_samples)), num_samples - 1)
    order = np.random.default_rng([seed, _HOLDOUT_STREAM]).permutation(num_samples)
    return np.sort(order[:size]), order[size:]


def make_partitioner(settings: DataSettings, *, num_classes: int | None, label_column: str) -> Any:
    """Build the flwr-datasets partitioner that ``settings.partition`` names.

    ``num_classes=None`` (not known yet, as for hub datasets) skips the ``classes_per_site``
    check; the caller must then call :func:`check_classes_per_site` once it is known.

    Raises:
        ConfigError: if ``classes_per_site`` is not in ``1..num_classes`` for ``pathological``.
    """
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if settings.partition == "iid":
        return IidPartitioner(num_partitions=settings.sites)
    if settings.partition == "dirichlet":
        return DirichletPartitioner(
            num_partitions=settings.sites,
            partition_by=label_column,
            alpha=float(settings.alpha),
            min_partition_size=MIN_SITE_SAMPLES,
            self_balancing=False,
            shuffle=True,
            seed=settings.seed,
        )
    if num_classes is not None:
        check_classes_per_site(settings, num_classes=num_classes)
    # "first-deterministic": site i always gets class i mod K, so with at least K sites every
    # class is used; the other classes of a site are drawn with the seed.
    return PathologicalPartitioner(
        num_partitions=settings.sites,
        partition_by=label_column,
        num_classes_per_partition=settings.classes_per_site,
        class_assignment_mode="first-deterministic",
        shuffle=True,
        seed=settings.seed,
    )


def check_classes_per_site(settings: DataSettings, *, num_classes: int) -> None:
    """Raise ConfigError if ``pathological`` asks for more classes per site than there are.

    Raises:
        ConfigError: if ``partition="pathological"`` and ``classes_per_site > num_classes``.
    """
    if settings.partition == "pathological" and settings.classes_per_site > num_classes:
        raise ConfigError(
            f"classes_per_site must be in 1..{num_classes} (the dataset's classes), "
            f"got {settings.classes_per_site}"
        )


def run_partitioner(settings: DataSettings, step: Callable[[], _T]) -> _T:
    """Call ``step`` (a partitioner or FederatedDataset call); its failures become ConfigError.

    flwr-datasets signals an impossible partitioning with ``ValueError`` (the Dirichlet
    partitioner gives up after 11 draws that leave a site below its minimum size, so this never
    loops forever) and warns on every failed draw; the warnings are silenced here.

    Raises:
        ConfigError: naming the partition settings and the partitioner's reason.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return step()
    except ValueError as exc:
        # flwr-datasets' first sentence is the reason; the rest suggests its own parameters.
        reason = one_line(exc).split(". ")[0].rstrip(".")
        if settings.partition == "dirichlet" and "max number of attempts" in reason:
            reason = (
                f"no draw from Dir(alpha={settings.alpha}) gave each of the {settings.sites} "
                f"sites at least {MIN_SITE_SAMPLES} samples; raise alpha or lower sites"
            )
        raise ConfigError(
            f"cannot partition into sites={settings.sites} with partition="
            f"{settings.partition!r} ({_partition_parameters(settings)}): {reason}"
        ) from exc


def partition_indices(
    settings: DataSettings, labels: np.ndarray, rest: np.ndarray, *, num_classes: int
) -> list[np.ndarray]:
    """Deal the samples ``rest`` (indices into ``labels``) to ``settings.sites`` sites.

    Returns:
        One int64 array of sample indices per site, each of at least :data:`MIN_SITE_SAMPLES`.

    Raises:
        ConfigError: if there are fewer than ``MIN_SITE_SAMPLES * sites`` samples, the partitioner
            cannot satisfy the settings, or a site ends up with too few samples.
    """
    needed = MIN_SITE_SAMPLES * settings.sites
    if rest.shape[0] < needed:
        raise ConfigError(
            f"sites={settings.sites} is too many for {rest.shape[0]} samples outside the "
            f"holdout: each site needs at least {MIN_SITE_SAMPLES} (one train, one test)"
        )
    if settings.partition == "iid":
        parts = iid_shards(rest, settings.sites)
    else:
        parts = _partition_with_flwr_datasets(settings, labels, rest, num_classes=num_classes)
    for site, part in enumerate(parts):
        check_site_size(settings, site, part.shape[0])
    return parts


def iid_shards(rest: np.ndarray, sites: int) -> list[np.ndarray]:
    """What flwr-datasets' ``IidPartitioner`` deals from ``rest`` (already in seeded random order):
    contiguous shards, the first ``len(rest) % sites`` one longer (``datasets.Dataset.shard`` with
    ``contiguous=True``), which is ``np.array_split``. Computed here because importing
    ``datasets`` and ``flwr_datasets`` costs seconds in every process that loads the data (each
    deployed ClientApp, the checks before a run); tests/data/test_partition.py checks that both
    deal the same shards."""
    return [np.asarray(part, dtype=np.int64) for part in np.array_split(rest, sites)]


def _partition_with_flwr_datasets(
    settings: DataSettings, labels: np.ndarray, rest: np.ndarray, *, num_classes: int
) -> list[np.ndarray]:
    import datasets

    table = datasets.Dataset.from_dict(
        {"idx": rest.astype(np.int64), "label": labels[rest].astype(np.int64)}
    )
    partitioner = make_partitioner(settings, num_classes=num_classes, label_column="label")
    partitioner.dataset = table

    def deal() -> list[np.ndarray]:
        return [_column(partitioner.load_partition(site), "idx") for site in range(settings.sites)]

    return run_partitioner(settings, deal)


def split_site(
    indices: np.ndarray, *, site_id: int, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one site's sample indices into ``(train, test)``, both non-empty, seeded per site.

    The test part holds ``round(test_fraction * n)`` samples, clipped to ``1..n-1``.

    Raises:
        ConfigError: if the site has fewer than :data:`MIN_SITE_SAMPLES` samples.
    """
    n = int(indices.shape[0])
    if n < MIN_SITE_SAMPLES:
        raise ConfigError(f"site {site_id} has {n} sample(s); it needs at least {MIN_SITE_SAMPLES}")
    size = min(max(1, round(test_fraction * n)), n - 1)
    order = np.random.default_rng([seed, _SITE_SPLIT_STREAM, site_id]).permutation(n)
    return indices[order[size:]], indices[order[:size]]


def check_site_size(settings: DataSettings, site_id: int, size: int) -> None:
    """Raise ConfigError if a site got fewer than :data:`MIN_SITE_SAMPLES` samples.

    Raises:
        ConfigError: naming the site, its size and the partition settings.
    """
    if size < MIN_SITE_SAMPLES:
        raise ConfigError(
            f"site {site_id} of sites={settings.sites} got {size} sample(s) with partition="
            f"{settings.partition!r} ({_partition_parameters(settings)}); each site needs at "
            f"least {MIN_SITE_SAMPLES}: use fewer sites or a milder partition"
        )


def _column(table: Any, name: str) -> np.ndarray:
    rows = table.with_format("arrow")[:]
    return np.asarray(rows.column(name).to_numpy(zero_copy_only=False), dtype=np.int64)


def _partition_parameters(settings: DataSettings) -> str:
    if settings.partition == "dirichlet":
        return f"alpha={settings.alpha}"
    if settings.partition == "pathological":
        return f"classes_per_site={settings.classes_per_site}"
    return f"seed={settings.seed}"
