"""The public loaders: a whole federation, one site, the server's holdout; cached per process.

In a simulation every site's ClientApp calls :func:`load_site` in every round, often in the same
worker process. The expensive part (reading the source, the holdout split, the partitioner) is done
once per process and per :class:`DataSettings` (``functools.lru_cache``); later calls return the
same, already built :class:`SiteData`. All results are deterministic for a seed: two processes with
equal settings see the same sites.

The arrays in returned records are shared between callers; copy before changing them in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedcore.data.arrays import ArrayDataset, FederatedData, SiteData
from fedcore.data.hub import HubSource, load_hub_site, open_hub
from fedcore.data.partition import partition_indices, split_holdout, split_site
from fedcore.data.settings import DataSettings
from fedcore.data.sources import load_source
from fedcore.errors import ConfigError

__all__ = ["clear_cache", "forget_sites", "load_federation", "load_holdout", "load_site"]


@dataclass(frozen=True, slots=True)
class _ArrayPlan:
    """All samples of an in-memory source and which of them go where."""

    data: ArrayDataset
    holdout: np.ndarray
    site_parts: tuple[np.ndarray, ...]
    num_classes: int
    description: str


def load_federation(settings: DataSettings) -> FederatedData:
    """Load the dataset and split it into the server's holdout and ``settings.sites`` sites.

    Deterministic for ``settings`` (the seed included), and cached: a second call with equal
    settings returns the same object.

    Raises:
        ConfigError: for an unknown dataset or path, an unreadable file, a missing label column,
            a non-numeric or non-finite feature, more sites than the samples allow (every site
            needs one train and one test sample), ``classes_per_site`` above the number of
            classes, or a partitioning the partitioner cannot satisfy. Nothing is cached then.
    """
    return _federation(settings)


def load_site(settings: DataSettings, site_id: int) -> SiteData:
    """Load site ``site_id`` (``0..settings.sites-1``): its partition, split into train and test.

    The first call in a process loads and partitions the dataset; later calls for any site of
    the same settings take microseconds (for ``hf:`` datasets, a site's first call reads its
    partition).

    Raises:
        ConfigError: if ``site_id`` is not an integer in ``0..sites-1``, and for every reason
            :func:`load_federation` gives.
    """
    if isinstance(site_id, bool) or not isinstance(site_id, int | np.integer):
        raise ConfigError(f"site_id must be an integer, got {site_id!r}")
    if not 0 <= site_id < settings.sites:
        raise ConfigError(f"site_id must be in 0..{settings.sites - 1}, got {site_id}")
    return _site(settings, int(site_id))


def load_holdout(settings: DataSettings) -> tuple[ArrayDataset, tuple[int, ...], int]:
    """Return ``(holdout, input_shape, num_classes)``: what the server needs for evaluation.

    The holdout shares no sample with any site. Cached like :func:`load_site`.

    Raises:
        ConfigError: for every reason :func:`load_federation` gives.
    """
    return _holdout(settings)


def clear_cache() -> None:
    """Forget every loaded dataset of this process (for tests and long-lived processes)."""
    for cached in (_federation, _site, _holdout, _array_plan, _hub_source):
        cached.cache_clear()


def forget_sites() -> None:
    """Release the sites' data this process holds (the dataset they are cut from stays): a
    simulated node that plays many sites loads each when it trains and releases it after."""
    _site.cache_clear()


@lru_cache(maxsize=4)
def _federation(settings: DataSettings) -> FederatedData:
    holdout, input_shape, num_classes = _holdout(settings)
    sites = tuple(_site(settings, site_id) for site_id in range(settings.sites))
    train_sizes = np.array([len(site.train) for site in sites])
    source = (
        _hub_source(settings).description if settings.is_hub else _array_plan(settings).description
    )
    parameters = {
        "dirichlet": f", alpha={settings.alpha}",
        "pathological": f", classes_per_site={settings.classes_per_site}",
    }
    description = (
        f"{source}; holdout {len(holdout)}; {settings.sites} sites, partition="
        f"{settings.partition}{parameters.get(settings.partition, '')}, seed={settings.seed}, "
        f"train samples per site min {train_sizes.min()} / median {int(np.median(train_sizes))}"
        f" / max {train_sizes.max()}"
    )
    return FederatedData(
        sites=sites,
        holdout=holdout,
        input_shape=input_shape,
        num_classes=num_classes,
        description=description,
    )


@lru_cache(maxsize=4096)
def _site(settings: DataSettings, site_id: int) -> SiteData:
    if settings.is_hub:
        return load_hub_site(_hub_source(settings), settings, site_id)
    plan = _array_plan(settings)
    train, test = split_site(
        plan.site_parts[site_id],
        site_id=site_id,
        test_fraction=settings.test_fraction,
        seed=settings.seed,
    )
    return SiteData(site_id=site_id, train=plan.data.take(train), test=plan.data.take(test))


@lru_cache(maxsize=16)
def _holdout(settings: DataSettings) -> tuple[ArrayDataset, tuple[int, ...], int]:
    if settings.is_hub:
        hub = _hub_source(settings)
        return hub.holdout, hub.input_shape, hub.num_classes
    plan = _array_plan(settings)
    shape = tuple(int(d) for d in plan.data.x.shape[1:])
    return plan.data.take(plan.holdout), shape, plan.num_classes


@lru_cache(maxsize=4)
def _array_plan(settings: DataSettings) -> _ArrayPlan:
    if settings.is_hub:
        raise ConfigError(f"dataset {settings.dataset!r} is a hub dataset, not an array source")
    cached = _plan_file(settings)
    if cached is not None and (plan := _read_plan(cached)) is not None:
        return plan
    data, num_classes, description = load_source(settings)
    holdout, rest = split_holdout(len(data), fraction=settings.holdout_fraction, seed=settings.seed)
    parts = partition_indices(settings, data.y, rest, num_classes=num_classes)
    plan = _ArrayPlan(
        data=data,
        holdout=holdout,
        site_parts=tuple(parts),
        num_classes=num_classes,
        description=description,
    )
    if cached is not None:
        _write_plan(cached, plan)
    return plan


DATA_CACHE_ENV = "FEDCORE_DATA_CACHE"
"""A private folder (``fedcore simulate`` makes one per run) where the first process of a run to
load an in-memory source keeps its plan (the samples, the holdout and every site's indices), keyed
by the data settings (and a local file's size and time), so that the run's other processes (the
simulation's server and every Ray worker) read it instead of building it again: they then never
import the source's reader (scikit-learn for digits) nor ``datasets`` and flwr-datasets for the
partitioner, seconds in each fresh process."""


def _plan_file(settings: DataSettings) -> Path | None:
    folder = os.environ.get(DATA_CACHE_ENV)
    if not folder:
        return None
    key = repr(settings)
    with contextlib.suppress(OSError):
        info = Path(settings.dataset).stat()  # a local file: its version is part of the key
        key += f"|{info.st_size}|{info.st_mtime_ns}"
    return Path(folder) / f"plan-{hashlib.sha256(key.encode()).hexdigest()}.npz"


def _read_plan(path: Path) -> _ArrayPlan | None:
    try:
        with np.load(path, allow_pickle=False) as saved:
            sizes = saved["sizes"]
            parts = np.split(saved["parts"], np.cumsum(sizes)[:-1]) if len(sizes) else []
            return _ArrayPlan(
                data=ArrayDataset(x=saved["x"], y=saved["y"]),
                holdout=saved["holdout"],
                site_parts=tuple(parts),
                num_classes=int(saved["num_classes"]),
                description=str(saved["description"]),
            )
    except (OSError, ValueError, KeyError, ConfigError):
        return None


def _write_plan(path: Path, plan: _ArrayPlan) -> None:
    """Written whole or not at all (a temporary file renamed); a failure only costs the cache."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as file:
            np.savez(
                file,
                x=plan.data.x,
                y=plan.data.y,
                holdout=plan.holdout,
                parts=np.concatenate(plan.site_parts) if plan.site_parts else np.zeros(0, np.int64),
                sizes=np.array([p.shape[0] for p in plan.site_parts], dtype=np.int64),
                num_classes=np.int64(plan.num_classes),
                description=np.str_(plan.description),
            )
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)


@lru_cache(maxsize=4)
def _hub_source(settings: DataSettings) -> HubSource:
    return open_hub(settings)
