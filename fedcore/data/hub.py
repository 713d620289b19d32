"""Hugging Face datasets through ``flwr_datasets.FederatedDataset`` (``dataset="hf:<name>"``).

``<name>`` is anything ``datasets.load_dataset`` accepts as a path: a Hub dataset name (needs the
network the first time; afterwards the Hugging Face cache serves it, also with
``HF_DATASETS_OFFLINE=1``) or a local directory of data files (Parquet, CSV, JSON, images), which
is how the tests exercise this path without a download.

The dataset's splits are normalised by a ``FederatedDataset`` preprocessor to two: ``train`` (the
dataset's ``train`` split, or its only split) is partitioned into sites with the partitioner that
the settings name; ``holdout`` (the dataset's ``test`` split, or else a seeded
``holdout_fraction`` of ``train``) is the server's central evaluation set. FederatedDataset shuffles
every split with the settings' seed before that.

A site loads only its own partition (``FederatedDataset.load_partition``); labels are encoded by
the sorted unique values of ``train`` and ``holdout`` together, so every site agrees on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcore.data.arrays import ArrayDataset, SiteData, encode_labels, one_line
from fedcore.data.partition import (
    MIN_SITE_SAMPLES,
    check_classes_per_site,
    check_site_size,
    make_partitioner,
    run_partitioner,
    split_site,
)
from fedcore.data.settings import HUB_PREFIX, DataSettings
from fedcore.data.sources import dataset_to_arrays
from fedcore.errors import ConfigError, FedcoreError

__all__ = ["HubSource", "load_hub_site", "open_hub"]

_TRAIN = "train"
_HOLDOUT = "holdout"


@dataclass(frozen=True, slots=True)
class HubSource:
    """An opened ``hf:`` dataset: the FederatedDataset, the label encoding and the holdout.

    Attributes:
        federated: the ``flwr_datasets.FederatedDataset`` (prepared: loaded, shuffled, resplit).
        classes: sorted unique raw label values; a label's code is its position here.
        holdout: the server's evaluation set, encoded.
        input_shape: shape of one sample.
        description: one line for a run record.
    """

    federated: Any
    classes: np.ndarray
    holdout: ArrayDataset
    input_shape: tuple[int, ...]
    description: str

    @property
    def num_classes(self) -> int:
        return int(self.classes.shape[0])


def open_hub(settings: DataSettings) -> HubSource:
    """Load and prepare an ``hf:`` dataset; partitions are dealt lazily by :func:`load_hub_site`.

    Raises:
        ConfigError: if the name is empty, the dataset cannot be loaded (unknown, offline and not
            cached, unreadable), has no usable split, lacks the label column, has non-numeric or
            non-finite features, has too few samples for the sites, or ``classes_per_site``
            exceeds its number of classes.
    """
    name = settings.dataset[len(HUB_PREFIX) :].strip()
    if not name:
        raise ConfigError(f"dataset {settings.dataset!r} names no Hugging Face dataset after 'hf:'")
    from flwr_datasets import FederatedDataset

    partitioner = make_partitioner(settings, num_classes=None, label_column=settings.label_column)
    federated = FederatedDataset(
        dataset=name,
        partitioners={_TRAIN: partitioner},
        preprocessor=_Resplit(settings),
        shuffle=True,
        seed=settings.seed,
    )
    try:
        train = federated.load_split(_TRAIN)
        holdout_table = federated.load_split(_HOLDOUT)
    except FedcoreError:
        raise
    except Exception as exc:  # any failure of datasets.load_dataset: unknown name, I/O, network
        raise ConfigError(f"cannot load dataset {settings.dataset!r}: {one_line(exc)}") from exc

    label = settings.label_column
    for split, table in ((_TRAIN, train), (_HOLDOUT, holdout_table)):
        if label not in table.column_names:
            raise ConfigError(
                f"dataset {settings.dataset!r} split {split!r} has no label column {label!r}; "
                f"its columns are {list(table.column_names)}"
            )
    raw_train = _labels(train, label)
    raw_holdout = _labels(holdout_table, label)
    _, classes = encode_labels(
        np.concatenate([raw_train, raw_holdout]), source=f"dataset {settings.dataset!r}"
    )
    check_classes_per_site(settings, num_classes=int(classes.shape[0]))
    if train.num_rows < MIN_SITE_SAMPLES * settings.sites:
        raise ConfigError(
            f"sites={settings.sites} is too many for the {train.num_rows} training samples of "
            f"{settings.dataset!r}: each site needs at least {MIN_SITE_SAMPLES}"
        )
    holdout = _encode(holdout_table, settings, classes, source=f"{settings.dataset!r} holdout")
    description = (
        f"{settings.dataset}: {train.num_rows} samples for sites, {len(holdout)} holdout, "
        f"shape {tuple(holdout.x.shape[1:])}, {classes.shape[0]} classes"
    )
    return HubSource(
        federated=federated,
        classes=classes,
        holdout=holdout,
        input_shape=tuple(int(d) for d in holdout.x.shape[1:]),
        description=description,
    )


def load_hub_site(source: HubSource, settings: DataSettings, site_id: int) -> SiteData:
    """Load one site's partition of an opened ``hf:`` dataset and split it into train and test.

    Raises:
        ConfigError: if the partitioner cannot satisfy the settings, the site gets fewer than
            :data:`~fedcore.data.partition.MIN_SITE_SAMPLES` samples, or its samples have another
            shape than the holdout's.
    """
    table = run_partitioner(settings, lambda: source.federated.load_partition(site_id, _TRAIN))
    check_site_size(settings, site_id, table.num_rows)
    data = _encode(table, settings, source.classes, source=f"{settings.dataset!r} site {site_id}")
    if tuple(data.x.shape[1:]) != source.input_shape:
        raise ConfigError(
            f"site {site_id} of {settings.dataset!r} has samples of shape "
            f"{tuple(data.x.shape[1:])}, the holdout {source.input_shape}"
        )
    train, test = split_site(
        np.arange(len(data)),
        site_id=site_id,
        test_fraction=settings.test_fraction,
        seed=settings.seed,
    )
    return SiteData(site_id=site_id, train=data.take(train), test=data.take(test))


class _Resplit:
    """FederatedDataset preprocessor: the dataset's splits become ``train`` and ``holdout``."""

    def __init__(self, settings: DataSettings) -> None:
        self._settings = settings

    def __call__(self, splits: Any) -> Any:
        import datasets

        names = sorted(splits.keys())
        if _TRAIN in splits:
            train = splits[_TRAIN]
        elif len(names) == 1:
            train = splits[names[0]]
        else:
            raise ConfigError(
                f"dataset {self._settings.dataset!r} has no 'train' split and several others "
                f"{names}; cannot tell which one to partition"
            )
        if "test" in splits and len(names) > 1:
            holdout = splits["test"]
        else:
            if train.num_rows < 2:
                raise ConfigError(
                    f"dataset {self._settings.dataset!r} has {train.num_rows} sample(s)"
                )
            size = min(
                max(1, round(self._settings.holdout_fraction * train.num_rows)), train.num_rows - 1
            )
            parts = train.train_test_split(test_size=size, shuffle=True, seed=self._settings.seed)
            train, holdout = parts["train"], parts["test"]
        return datasets.DatasetDict({_TRAIN: train, _HOLDOUT: holdout})


def _labels(table: Any, column: str) -> np.ndarray:
    rows = table.select_columns([column]).with_format("arrow")[:]
    return np.asarray(rows.column(column).to_numpy(zero_copy_only=False))


def _encode(
    table: Any, settings: DataSettings, classes: np.ndarray, *, source: str
) -> ArrayDataset:
    x, raw = dataset_to_arrays(table, label_column=settings.label_column, source=source)
    codes = np.searchsorted(classes, raw)
    codes = np.clip(codes, 0, classes.shape[0] - 1)
    if raw.shape[0] and not np.array_equal(classes[codes], raw):
        raise ConfigError(f"{source} has labels outside the dataset's classes {classes.tolist()}")
    return ArrayDataset(x=x, y=codes.astype(np.int64))
