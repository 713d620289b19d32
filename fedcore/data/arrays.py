"""In-memory data records: a labelled array set, one site's data, a whole federation.

Every source (bundled digits, the synthetic generator, local files, the Hugging Face Hub) ends in
the same shape: float32 features ``x`` of shape ``(n, *input_shape)`` and int64 labels ``y`` in
``0..num_classes-1``. The helpers here turn raw features and labels of any type into that shape,
and check them, so that every source fails the same way on the same bad input.

The records are frozen, but the numpy arrays inside them are ordinary (writable) arrays: loading is
cached per process (see :mod:`fedcore.data.federation`), so the same arrays may be handed to several
callers. Copy before modifying in place (``torch.tensor`` copies; ``torch.from_numpy`` does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcore.errors import ConfigError

__all__ = [
    "ArrayDataset",
    "FederatedData",
    "SiteData",
    "check_features",
    "encode_labels",
    "one_line",
]


@dataclass(frozen=True, slots=True)
class ArrayDataset:
    """Features and labels of one set of samples.

    Attributes:
        x: float32 array of shape ``(n, *input_shape)``.
        y: int64 array of shape ``(n,)`` with values in ``0..num_classes-1``.

    Raises:
        ConfigError: at construction, if ``x`` is not float32, ``y`` is not a one-dimensional
            int64 array, or the two do not have the same number of rows.
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.x, np.ndarray) or self.x.dtype != np.float32 or self.x.ndim < 2:
            raise ConfigError(
                f"features must be a float32 array of shape (n, ...), got {_describe(self.x)}"
            )
        if not isinstance(self.y, np.ndarray) or self.y.dtype != np.int64 or self.y.ndim != 1:
            raise ConfigError(f"labels must be a 1-d int64 array, got {_describe(self.y)}")
        if self.x.shape[0] != self.y.shape[0]:
            raise ConfigError(
                f"features have {self.x.shape[0]} rows but labels have {self.y.shape[0]}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, indices: np.ndarray) -> ArrayDataset:
        """Return the rows at ``indices`` (a new dataset; the arrays are copies)."""
        return ArrayDataset(x=self.x[indices], y=self.y[indices])


@dataclass(frozen=True, slots=True)
class SiteData:
    """The data of one data-center site: one partition, split into train and test.

    ``train`` always holds at least one sample, and so does ``test``.
    """

    site_id: int
    train: ArrayDataset
    test: ArrayDataset


@dataclass(frozen=True, slots=True)
class FederatedData:
    """All sites of a federation plus the server's held-out set.

    Attributes:
        sites: one :class:`SiteData` per site, ``sites[i].site_id == i``.
        holdout: the server's central evaluation set; no sample of it is in any site.
        input_shape: shape of one sample, e.g. ``(1, 8, 8)`` for digits.
        num_classes: number of distinct labels in the whole dataset.
        description: a one-line human-readable summary (source, sizes, partitioning).
    """

    sites: tuple[SiteData, ...]
    holdout: ArrayDataset
    input_shape: tuple[int, ...]
    num_classes: int
    description: str


def encode_labels(raw: np.ndarray, *, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Map labels of any sortable type to ``0..K-1`` by their sorted unique values.

    Returns:
        ``(codes, classes)``: int64 codes of shape ``(n,)`` and the sorted unique raw values, so
        that ``classes[codes] == raw``.

    Raises:
        ConfigError: if the labels are not one-dimensional, are missing or non-finite (NaN,
            None), cannot be sorted (mixed types), or hold fewer than two distinct values.
    """
    labels = np.asarray(raw)
    if labels.ndim != 1:
        raise ConfigError(f"labels of {source} must be one-dimensional, got shape {labels.shape}")
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise ConfigError(f"labels of {source} contain NaN or infinite values")
    if labels.dtype.kind == "O" and any(value is None for value in labels):
        raise ConfigError(f"labels of {source} contain missing values (None)")
    try:
        classes, codes = np.unique(labels, return_inverse=True)
    except TypeError as exc:
        raise ConfigError(
            f"labels of {source} cannot be sorted (mixed types?): {one_line(exc)}"
        ) from exc
    if classes.shape[0] < 2:
        raise ConfigError(
            f"labels of {source} must take at least 2 distinct values, got {classes.tolist()}"
        )
    return codes.reshape(-1).astype(np.int64), classes


def check_features(raw: np.ndarray, *, source: str) -> np.ndarray:
    """Return ``raw`` as a float32 array of shape ``(n, ...)``; a 1-d array becomes ``(n, 1)``.

    Raises:
        ConfigError: if the features are not numeric, are empty, or hold NaN or infinite values
            (the message gives how many and the first row).
    """
    features = np.asarray(raw)
    if features.dtype.kind not in "biuf":
        raise ConfigError(f"features of {source} must be numeric, got dtype {features.dtype}")
    if features.ndim == 0 or features.shape[0] == 0:
        raise ConfigError(f"{source} holds no samples (features of shape {features.shape})")
    if features.ndim == 1:
        features = features.reshape(-1, 1)
    if features.size == 0:
        raise ConfigError(f"{source} has samples without features (shape {features.shape})")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow shows up as inf just below
        out = features.astype(np.float32, copy=False)
    finite = np.isfinite(out)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.reshape(out.shape[0], -1).all(axis=1))
        raise ConfigError(
            f"features of {source} hold non-finite values (NaN or infinite, possibly after "
            f"conversion to float32) in {bad_rows.size} rows, the first is row {int(bad_rows[0])}"
        )
    return out


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (ConfigError messages are one line), or its type name."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__
