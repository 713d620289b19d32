"""Where samples come from: bundled digits, a seeded generator, local files, Hugging Face tables.

Each source returns one :class:`~fedcore.data.arrays.ArrayDataset` holding *all* its samples
(float32 features, labels encoded to ``0..K-1`` by sorted unique value) with the number of classes
and a short description. Splitting into holdout and sites happens later, in one place, whatever the
source (:mod:`fedcore.data.partition`).

Supported local files:

- ``.npz`` with arrays ``x`` (``(n, ...)``, numeric) and ``y`` (``(n,)``, any sortable type);
- ``.csv`` and ``.parquet``: one label column (``DataSettings.label_column``), every other column a
  numeric feature;
- a directory written by ``datasets.Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (all
  splits of a ``DatasetDict`` are pooled): numeric columns, or a single image or array column,
  plus the label column.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.data.arrays import ArrayDataset, check_features, encode_labels, one_line
from fedcore.data.settings import BUILTIN_DATASETS, HUB_PREFIX, DataSettings
from fedcore.errors import ConfigError

__all__ = ["SourceData", "dataset_to_arrays", "load_source", "read_local", "synthetic_arrays"]

SourceData = tuple[ArrayDataset, int, str]
"""(all samples, number of classes, description) as returned by :func:`load_source`."""

_FILE_SUFFIXES = (".npz", ".csv", ".parquet")
_SYNTHETIC_CENTRE_NORM = 3.0  # distance of a class centre from the origin, in noise std units


def _synthetic(settings: DataSettings) -> SourceData:
    return synthetic_arrays(
        samples=settings.synthetic_samples,
        features=settings.synthetic_features,
        classes=settings.synthetic_classes,
        seed=settings.seed,
    )


# The built-in datasets, name -> loader: a new built-in dataset is one entry here (its name is
# BUILTIN_DATASETS, which a test keeps equal to these keys; provenance and the help read that).
BUILTIN_LOADERS: dict[str, Callable[[DataSettings], SourceData]] = {
    "digits": lambda settings: _digits(),
    "synthetic": _synthetic,
}


def load_source(settings: DataSettings) -> SourceData:
    """Load every sample of ``settings.dataset`` (not ``hf:`` datasets: see :mod:`.hub`).

    Raises:
        ConfigError: for an unknown dataset name or path, a file that cannot be read, a missing
            label column, a non-numeric feature column, non-finite features, or labels with fewer
            than two distinct values.
    """
    name = settings.dataset
    if name in BUILTIN_LOADERS:
        return BUILTIN_LOADERS[name](settings)
    if name.startswith(HUB_PREFIX):
        raise ConfigError(f"dataset {name!r} is a hub dataset; load it with fedcore.data.hub")
    path = Path(name).expanduser()
    if not path.exists():
        raise ConfigError(
            f"unknown dataset {name!r}: not one of {', '.join(BUILTIN_DATASETS)}, "
            f"'{HUB_PREFIX}<name>', nor an existing file or directory"
        )
    x, labels = read_local(path, label_column=settings.label_column)
    return _finish(x, labels, source=str(path))


def read_local(path: Path, *, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    """Checked float32 features and raw (not yet encoded) labels of a local dataset file or
    ``save_to_disk`` directory: the one reader of each file type, for the simulation's whole
    dataset and for a deployed site's own file alike.

    Raises:
        ConfigError: for an unsupported file type, a file that cannot be read, missing arrays or
            label column, a non-numeric feature column, or non-finite features.
    """
    if path.is_dir():
        return _saved_hf_dataset(path, label_column=label_column)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _npz(path)
    if suffix in (".csv", ".parquet"):
        return _table(path, label_column=label_column)
    raise ConfigError(
        f"dataset file {str(path)!r} has an unsupported type {suffix!r}; "
        f"expected one of {', '.join(_FILE_SUFFIXES)} or a save_to_disk directory"
    )


def synthetic_arrays(*, samples: int, features: int, classes: int, seed: int) -> SourceData:
    """Gaussian class clusters: a model can learn them, and they scale to millions of samples.

    Each class ``k`` has a centre ``c_k`` drawn uniformly on the sphere of radius 3 (in units of
    the noise standard deviation), and a sample of class ``k`` is ``c_k + N(0, I)``. Classes are
    balanced to within one sample. Deterministic for a seed; about 50 ms per million values.

    Raises:
        ConfigError: if ``samples < classes`` (some class would have no sample) or ``classes < 2``.
    """
    if classes < 2:
        raise ConfigError(f"synthetic_classes must be >= 2, got {classes}")
    if samples < classes:
        raise ConfigError(
            f"synthetic_samples={samples} is fewer than synthetic_classes={classes}; "
            "every class needs at least one sample"
        )
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, features))
    norms = np.linalg.norm(centres, axis=1, keepdims=True)
    centres = (_SYNTHETIC_CENTRE_NORM * centres / np.maximum(norms, 1e-12)).astype(np.float32)
    y = np.arange(samples, dtype=np.int64) % classes
    rng.shuffle(y)
    x = rng.standard_normal((samples, features), dtype=np.float32)
    x += centres[y]
    description = f"synthetic: {samples} samples, {features} features, {classes} classes"
    return ArrayDataset(x=x, y=y), classes, description


def dataset_to_arrays(
    table: Any, *, label_column: str, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """Turn a ``datasets.Dataset`` into float32 features and raw (not yet encoded) labels.

    Features are either every non-label column, each a numeric scalar, or one image column
    (uint8 pixels scaled to [0, 1], laid out channels-first ``(n, C, H, W)``), or one column of
    fixed-shape numeric arrays.

    Raises:
        ConfigError: if the label column is missing, there is no feature column, a column is not
            numeric, images or arrays differ in shape, or features are not finite.
    """
    import datasets

    columns = list(table.column_names)
    if label_column not in columns:
        raise ConfigError(
            f"{source} has no label column {label_column!r}; its columns are {columns}"
        )
    feature_columns = [c for c in columns if c != label_column]
    if not feature_columns:
        raise ConfigError(f"{source} has only the label column {label_column!r}, no features")
    # Through the arrow formatter, not ``table.data``: a shuffled or selected dataset (as
    # partitioners return) keeps its full table plus an indices mapping.
    rows = table.with_format("arrow")[:]
    labels = np.asarray(rows.column(label_column).to_numpy(zero_copy_only=False))
    if len(feature_columns) == 1:
        (column,) = feature_columns
        kind = table.features[column]
        if isinstance(kind, datasets.Image | datasets.List | datasets.Sequence) or (
            type(kind).__name__.startswith("Array")
        ):
            return _array_column(
                table, column, is_image=isinstance(kind, datasets.Image), source=source
            ), labels
    blocks = []
    for column in feature_columns:
        kind = table.features[column]
        dtype = getattr(kind, "dtype", None)
        if not isinstance(kind, datasets.Value) or not _is_numeric_arrow_type(str(dtype)):
            raise ConfigError(
                f"{source}: feature column {column!r} is not numeric ({kind}); every column "
                f"except the label {label_column!r} must be a number, or the only feature "
                "must be an image or array column"
            )
        values = rows.column(column).to_numpy(zero_copy_only=False)
        blocks.append(np.asarray(values, dtype=np.float64))
    return check_features(np.stack(blocks, axis=1), source=source), labels


def _array_column(table: Any, column: str, *, is_image: bool, source: str) -> np.ndarray:
    values = table.select_columns([column]).with_format("numpy")[:][column]
    if not isinstance(values, np.ndarray) or values.dtype == object:
        raise ConfigError(
            f"{source}: column {column!r} holds {'images' if is_image else 'arrays'} of "
            "different shapes; every sample must have the same shape"
        )
    if is_image:
        pixels = values.astype(np.float32) / 255.0
        if pixels.ndim == 3:  # (n, H, W) greyscale
            pixels = pixels[:, None, :, :]
        elif pixels.ndim == 4:  # (n, H, W, C) -> (n, C, H, W)
            pixels = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
        return check_features(pixels, source=source)
    return check_features(values, source=source)


def _is_numeric_arrow_type(dtype: str) -> bool:
    return dtype == "bool" or dtype.startswith(("int", "uint", "float"))


def _rows(x: np.ndarray, raw_labels: np.ndarray, *, source: str) -> tuple[np.ndarray, np.ndarray]:
    if raw_labels.ndim >= 1 and raw_labels.shape[0] != x.shape[0]:
        raise ConfigError(f"{source}: {x.shape[0]} feature rows but {raw_labels.shape[0]} labels")
    return x, raw_labels


def _finish(x: np.ndarray, raw_labels: np.ndarray, *, source: str) -> SourceData:
    features = check_features(x, source=source)
    codes, classes = encode_labels(raw_labels, source=source)
    if codes.shape[0] != features.shape[0]:
        raise ConfigError(f"{source}: {features.shape[0]} feature rows but {codes.shape[0]} labels")
    description = (
        f"{source}: {codes.shape[0]} samples of shape {tuple(features.shape[1:])}, "
        f"{classes.shape[0]} classes"
    )
    return ArrayDataset(x=features, y=codes), int(classes.shape[0]), description


def _digits() -> SourceData:
    images, target = _digits_arrays()
    images = np.asarray(images, dtype=np.float32) / np.float32(16.0)
    return _finish(images[:, None, :, :], np.asarray(target), source="digits")


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``load_digits`` reads them: its ``datasets/data/digits.csv.gz`` (64
    pixels then the label per row), read here without importing scikit-learn, which alone costs
    a second or two in every process that loads the data (each deployed ClientApp, preflight).
    ``load_digits`` itself where that file is not found."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise ConfigError(
                    f"{str(path)!r} lacks array(s) {missing}; it holds {archive.files}, "
                    "expected 'x' (features) and 'y' (labels)"
                )
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"cannot read {str(path)!r} as .npz: {one_line(exc)}") from exc
    return _rows(check_features(x, source=str(path)), np.asarray(y), source=str(path))


def _table(path: Path, *, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    try:
        frame = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {one_line(exc)}") from exc
    if label_column not in frame.columns:
        raise ConfigError(
            f"{str(path)!r} has no label column {label_column!r}; "
            f"its columns are {[str(c) for c in frame.columns]}"
        )
    features = frame.drop(columns=[label_column])
    if features.shape[1] == 0:
        raise ConfigError(f"{str(path)!r} has only the label column {label_column!r}")
    for column in features.columns:
        series = features[column]
        if not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_complex_dtype(series):
            raise ConfigError(
                f"{str(path)!r}: column {str(column)!r} is not numeric (dtype {series.dtype}); "
                f"every column except the label {label_column!r} must be a number"
            )
    labels = frame[label_column]
    if labels.isna().any():
        raise ConfigError(f"{str(path)!r}: label column {label_column!r} has missing values")
    x = features.to_numpy(dtype=np.float64, na_value=np.nan)
    return check_features(x, source=str(path)), labels.to_numpy()


def _saved_hf_dataset(path: Path, *, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise ConfigError(
            f"dataset directory {str(path)!r} is not a dataset written by save_to_disk: "
            f"{one_line(exc)}"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        parts = [loaded[split] for split in sorted(loaded.keys())]
        if not parts:
            raise ConfigError(f"dataset directory {str(path)!r} holds no split")
        try:
            table = datasets.concatenate_datasets(parts)
        except ValueError as exc:
            raise ConfigError(
                f"splits of {str(path)!r} have different columns: {one_line(exc)}"
            ) from exc
    else:
        table = loaded
    return dataset_to_arrays(table, label_column=label_column, source=str(path))
