"""Which data a node trains on, named by the node's config.

A node's config (Flower's ``--node-config`` on ``flower-supernode``; set by Flower itself in
simulation) chooses one of two sources:

``partition-id`` (and optionally ``num-partitions``)
    The site trains on that partition of the run's dataset, split exactly as ``fedcore simulate``
    splits it (same settings, same seed, same sites). Flower's simulation sets both keys. In a
    deployment this is the demonstration mode: every host can build the same split of a public
    dataset (``digits``, ``synthetic``). If ``num-partitions`` is given it must equal the run's
    ``sites`` setting, or the site would train on a partition of a different split.

``data-path`` (and optionally ``label-classes``, ``partition-id``)
    The site's own file on its own host: ``.npz`` with arrays ``x`` and ``y``, ``.csv`` or
    ``.parquet`` with the run's ``label_column`` and numeric feature columns, or a directory written
    by ``datasets``' ``save_to_disk``. Every sample belongs to this site and is split into train and
    test by the run's ``test_fraction`` and ``seed``. ``partition-id``, if given, is the site's
    number (it seeds the split and the batch order); it defaults to 0.

Labels of a site-local file must be coded exactly as the server codes the labels of its own
``dataset`` (the server's model has ``num-classes`` outputs and class ``k`` is output ``k``). A
site cannot re-encode its labels by its own sorted values, as :mod:`fedcore.data.sources` does for
a whole dataset, because a site that lacks a class would shift every class after it. So:

- with ``label-classes`` (comma-separated, e.g. ``label-classes="benign,malignant"``), a sample's
  class is the position of its label, compared as text, in that list; give the list in the order
  the server's dataset sorts its labels (sorted unique values), or ``0,1,...,K-1`` for integer
  labels;
- without it, labels must already be integer class ids ``0..K-1``.

A label outside the list, or a negative or fractional label, is refused with a
:class:`~fedcore.errors.ConfigError`. Whether ``K`` matches the server's ``num-classes`` can only be
checked where both are known, when the site trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.config import Settings
from fedcore.data import ArrayDataset, DataSettings, SiteData, load_site
from fedcore.data.arrays import one_line
from fedcore.data.partition import split_site
from fedcore.data.sources import read_local
from fedcore.errors import ConfigError

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"
LABEL_CLASSES = "label-classes"


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
    """The site's data, from ``data-path`` if the node config has it, else from ``partition-id``.

    Raises :class:`ConfigError` for a node config with neither key, a ``partition-id`` that is not
    an integer in ``0..sites-1``, a ``num-partitions`` other than ``sites``, a file that cannot be
    read, or labels that are not class ids (see the module docstring). Nothing is cached then.
    """
    if DATA_PATH in node_config:
        return local_site(
            node_config[DATA_PATH],
            site_id=_int_key(node_config, PARTITION_ID, default=0),
            label_classes=_label_classes(node_config.get(LABEL_CLASSES)),
            label_column=settings.label_column,
            test_fraction=settings.test_fraction,
            seed=settings.seed,
        )
    if PARTITION_ID not in node_config:
        raise ConfigError(
            f"node config needs {PARTITION_ID!r} (a partition of the run's dataset) or "
            f"{DATA_PATH!r} (a site-local file), got {dict(node_config)}"
        )
    site_id = _int_key(node_config, PARTITION_ID, default=0)
    if NUM_PARTITIONS in node_config:
        partitions = _int_key(node_config, NUM_PARTITIONS, default=0)
        if partitions != settings.sites:
            raise ConfigError(
                f"node config has {NUM_PARTITIONS}={partitions}, but the run has sites="
                f"{settings.sites}; the partition would come from a different split"
            )
    return load_site(data_settings(settings), site_id)


def _int_key(node_config: Mapping[str, Any], key: str, *, default: int) -> int:
    raw = node_config.get(key, default)
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ConfigError(f"node config {key!r} must be an integer, got {raw!r}")
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"node config {key!r} must be an integer, got {raw!r}") from exc


def _label_classes(raw: object) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ConfigError(
            f"node config {LABEL_CLASSES!r} must be a comma-separated string, got {raw!r}"
        )
    classes = tuple(part.strip() for part in raw.split(","))
    if len(classes) < 2 or any(not c for c in classes) or len(set(classes)) != len(classes):
        raise ConfigError(
            f"node config {LABEL_CLASSES!r} must list at least two distinct, non-empty labels "
            f"separated by commas, got {raw!r}"
        )
    return classes


def local_site(
    path: object,
    *,
    site_id: int,
    label_classes: tuple[str, ...] | None,
    label_column: str,
    test_fraction: float,
    seed: int,
) -> SiteData:
    """A site's own file, split into train and test; cached per process (on the file's mtime).

    Raises :class:`ConfigError` for a path that is not a string or does not exist, a file that
    cannot be read, non-numeric or non-finite features, too few samples, or labels that are not
    class ids (``label_classes`` given: a label not in it; not given: a label that is not an
    integer >= 0).
    """
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"node config {DATA_PATH!r} must be a path, got {path!r}")
    file = Path(path).expanduser()
    try:
        stamp = file.stat().st_mtime_ns
    except OSError as exc:
        raise ConfigError(
            f"node config {DATA_PATH!r} names {path!r}, which cannot be read: {one_line(exc)}"
        ) from exc
    return _local_site(
        str(file.resolve()), stamp, site_id, label_classes, label_column, test_fraction, seed
    )


@lru_cache(maxsize=16)
def _local_site(
    path: str,
    _stamp: int,
    site_id: int,
    label_classes: tuple[str, ...] | None,
    label_column: str,
    test_fraction: float,
    seed: int,
) -> SiteData:
    x, raw_labels = read_local(Path(path), label_column=label_column)
    y = class_ids(raw_labels, label_classes, source=path)
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"{path}: {x.shape[0]} feature rows but {y.shape[0]} labels")
    data = ArrayDataset(x=x, y=y)
    train, test = split_site(
        np.arange(len(data)), site_id=site_id, test_fraction=test_fraction, seed=seed
    )
    return SiteData(site_id=site_id, train=data.take(train), test=data.take(test))


def class_ids(raw: np.ndarray, label_classes: tuple[str, ...] | None, *, source: str) -> np.ndarray:
    """Raw labels as int64 class ids, by ``label_classes`` (labels compared as text) or as given.

    Raises :class:`ConfigError` for labels that are not one-dimensional, a label not in
    ``label_classes``, or (without it) a label that is not an integer >= 0.
    """
    labels = np.asarray(raw)
    if labels.ndim != 1:
        raise ConfigError(f"labels of {source} must be one-dimensional, got shape {labels.shape}")
    if label_classes is not None:
        index = {name: i for i, name in enumerate(label_classes)}
        texts = [_label_text(value) for value in labels.tolist()]
        unknown = sorted({t for t in texts if t not in index})
        if unknown:
            raise ConfigError(
                f"labels of {source} include {unknown[:5]}, "
                f"not in {LABEL_CLASSES} {list(label_classes)}"
            )
        return np.fromiter((index[t] for t in texts), dtype=np.int64, count=len(texts))
    if labels.dtype.kind in "iu":
        ids = labels.astype(np.int64)
    elif (
        labels.dtype.kind == "f"
        and np.isfinite(labels).all()
        and (labels == np.round(labels)).all()
    ):
        ids = labels.astype(np.int64)
    elif labels.dtype.kind == "b":
        ids = labels.astype(np.int64)
    else:
        raise ConfigError(
            f"labels of {source} are {labels.dtype} values, not integer class ids; list the "
            f'classes in the node config, e.g. {LABEL_CLASSES}="a,b,c" in the server\'s order'
        )
    if ids.size and ids.min() < 0:
        raise ConfigError(f"labels of {source} must be class ids >= 0, got {int(ids.min())}")
    return ids


def _label_text(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)
