"""Every source loads (each test writes its own files), and every bad input is a ConfigError."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedcore.data import DataSettings, load_federation, load_holdout, load_site
from fedcore.data.sources import synthetic_arrays
from fedcore.errors import ConfigError

N = 120


def _table(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = np.array(["cat", "ant", "bee"])[np.arange(N) % 3]
    return pd.DataFrame(
        {
            "f0": rng.normal(size=N),
            "f1": rng.integers(0, 5, size=N),
            "flag": rng.integers(0, 2, size=N).astype(bool),
            "species": labels,
        }
    )


def _all_labels(settings: DataSettings) -> np.ndarray:
    data = load_federation(settings)
    parts = [data.holdout.y] + [np.concatenate([s.train.y, s.test.y]) for s in data.sites]
    return np.concatenate(parts)


def test_digits() -> None:
    data = load_federation(DataSettings(sites=3))
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    x = np.concatenate([data.holdout.x] + [s.train.x for s in data.sites])
    assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
    assert "digits" in data.description and "1797" in data.description


def test_synthetic_is_seeded_balanced_and_learnable() -> None:
    a, classes, _ = synthetic_arrays(samples=1000, features=5, classes=4, seed=7)
    b, _, _ = synthetic_arrays(samples=1000, features=5, classes=4, seed=7)
    c, _, _ = synthetic_arrays(samples=1000, features=5, classes=4, seed=8)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y) and not np.array_equal(a.x, c.x)
    assert classes == 4 and np.bincount(a.y).tolist() == [250] * 4
    # Nearest class mean (fitted on half, scored on the other half) must beat chance by far.
    means = np.stack([a.x[:500][a.y[:500] == k].mean(axis=0) for k in range(4)])
    distance = ((a.x[500:, None, :] - means[None]) ** 2).sum(axis=2)
    accuracy = float((distance.argmin(axis=1) == a.y[500:]).mean())
    assert accuracy > 0.7  # chance is 0.25; the clusters overlap a little by design


def test_synthetic_scales_to_100k_samples_and_100_sites() -> None:
    settings = DataSettings(
        dataset="synthetic",
        synthetic_samples=100_000,
        sites=100,
        synthetic_features=32,
        synthetic_classes=10,
        seed=1,
    )
    site = load_site(settings, 99)  # timings live in benchmarks, never in a test
    assert site.train.x.shape[1:] == (32,) and len(site.train) + len(site.test) == 800
    holdout, shape, classes = load_holdout(settings)
    assert len(holdout) == 20_000 and shape == (32,) and classes == 10


def test_synthetic_with_fewer_samples_than_classes() -> None:
    with pytest.raises(ConfigError, match="synthetic_samples=3"):
        load_federation(
            DataSettings(dataset="synthetic", synthetic_samples=3, synthetic_classes=5, sites=1)
        )


def test_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 3, 4)).astype(np.float64)
    y = np.array([10, 20, 30, 40])[np.arange(N) % 4]
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y)
    settings = DataSettings(dataset=str(path), sites=4, partition="dirichlet", alpha=1.0)
    data = load_federation(settings)
    assert data.input_shape == (3, 4) and data.num_classes == 4
    assert np.bincount(_all_labels(settings)).tolist() == [30, 30, 30, 30]
    # Features arrive unchanged (as float32): every holdout row is a row of x.
    source = {row.tobytes() for row in x.astype(np.float32).reshape(N, -1)}
    assert all(row.tobytes() in source for row in data.holdout.x.reshape(len(data.holdout), -1))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_csv_and_parquet_with_string_labels(tmp_path: Path, suffix: str) -> None:
    frame = _table()
    path = tmp_path / f"table{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    settings = DataSettings(dataset=str(path), sites=3, label_column="species")
    data = load_federation(settings)
    assert data.input_shape == (3,) and data.num_classes == 3
    # Labels are mapped by sorted value: ant=0, bee=1, cat=2.
    by_f0 = dict(zip(frame["f0"].astype(np.float32), frame["species"], strict=True))
    names = ["ant", "bee", "cat"]
    for site in data.sites:
        for row, code in zip(site.train.x, site.train.y, strict=True):
            assert by_f0[row[0]] == names[code]
    assert sorted(_all_labels(settings).tolist()) == sorted([0, 1, 2] * 40)


def test_saved_hf_dataset_numeric_columns(tmp_path: Path) -> None:
    import datasets

    frame = _table()
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))
    data = load_federation(
        DataSettings(dataset=str(tmp_path / "saved"), sites=2, label_column="species")
    )
    assert data.input_shape == (3,) and data.num_classes == 3
    assert len(data.holdout) + sum(len(s.train) + len(s.test) for s in data.sites) == N


def test_saved_hf_dataset_dict_with_image_column(tmp_path: Path) -> None:
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(60, 6, 5), dtype=np.uint8)
    pixels[0] = 255
    table = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p) for p in pixels], "label": np.arange(60) % 3}
    ).cast_column("image", datasets.Image())
    parts = table.train_test_split(test_size=20, shuffle=False)
    parts.save_to_disk(str(tmp_path / "images"))
    settings = DataSettings(dataset=str(tmp_path / "images"), sites=2)
    data = load_federation(settings)
    assert data.input_shape == (1, 6, 5) and data.num_classes == 3
    x = np.concatenate(
        [data.holdout.x] + [s.train.x for s in data.sites] + [s.test.x for s in data.sites]
    )
    assert x.shape[0] == 60 and 0.0 <= x.min() and x.max() == 1.0
    expected = {(p.astype(np.float32) / 255).tobytes() for p in pixels}
    assert {row[0].tobytes() for row in x} == expected


def test_saved_hf_dataset_with_array_column(tmp_path: Path) -> None:
    import datasets

    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(40, 7)).tolist()
    datasets.Dataset.from_dict({"v": vectors, "y": [i % 2 for i in range(40)]}).save_to_disk(
        str(tmp_path / "arrays")
    )
    data = load_federation(
        DataSettings(dataset=str(tmp_path / "arrays"), sites=2, label_column="y")
    )
    assert data.input_shape == (7,) and data.num_classes == 2


# --- bad inputs ---------------------------------------------------------------------------------


def _expect(settings: DataSettings, pattern: str) -> str:
    with pytest.raises(ConfigError, match=pattern) as caught:
        load_federation(settings)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_unknown_dataset_and_missing_path(tmp_path: Path) -> None:
    _expect(DataSettings(dataset="mnist"), "unknown dataset 'mnist'")
    missing = str(tmp_path / "missing.npz")
    _expect(DataSettings(dataset=missing), "unknown dataset .*missing.npz")


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"x": [1]}))
    _expect(DataSettings(dataset=str(path)), r"unsupported type '\.json'")


@pytest.mark.parametrize("suffix", [".npz", ".csv", ".parquet"])
def test_unreadable_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00\xff\x00garbage" if suffix != ".csv" else b"")
    _expect(DataSettings(dataset=str(path)), "cannot read")


def test_directory_that_is_not_a_saved_dataset(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    _expect(DataSettings(dataset=str(tmp_path / "plain")), "not a dataset written by save_to_disk")


def test_npz_without_y_and_with_mismatched_rows(tmp_path: Path) -> None:
    np.savez(tmp_path / "no_y.npz", x=np.zeros((10, 2)))
    _expect(DataSettings(dataset=str(tmp_path / "no_y.npz"), sites=1), r"lacks array\(s\) \['y'\]")
    np.savez(tmp_path / "rows.npz", x=np.zeros((10, 2)), y=np.arange(9) % 2)
    _expect(DataSettings(dataset=str(tmp_path / "rows.npz"), sites=1), "10 feature rows but 9")


def test_non_finite_features(tmp_path: Path) -> None:
    x = np.ones((20, 3))
    x[7, 1] = np.nan
    x[9, 0] = np.inf
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(20) % 2)
    message = _expect(DataSettings(dataset=str(tmp_path / "nan.npz"), sites=1), "non-finite")
    assert "2 rows" in message and "row 7" in message
    frame = _table()
    frame.loc[3, "f0"] = np.nan
    frame.to_csv(tmp_path / "nan.csv", index=False)
    _expect(DataSettings(dataset=str(tmp_path / "nan.csv"), label_column="species"), "non-finite")


def test_overflowing_float32_is_non_finite(tmp_path: Path) -> None:
    np.savez(tmp_path / "big.npz", x=np.full((20, 2), 1e300), y=np.arange(20) % 2)
    _expect(DataSettings(dataset=str(tmp_path / "big.npz"), sites=1), "non-finite")


def test_missing_label_column(tmp_path: Path) -> None:
    _table().to_csv(tmp_path / "t.csv", index=False)
    message = _expect(DataSettings(dataset=str(tmp_path / "t.csv")), "no label column 'label'")
    assert "species" in message
    import datasets

    datasets.Dataset.from_pandas(_table()).save_to_disk(str(tmp_path / "saved"))
    _expect(DataSettings(dataset=str(tmp_path / "saved")), "no label column 'label'")


def test_non_numeric_feature_column_is_named(tmp_path: Path) -> None:
    frame = _table()
    frame["colour"] = ["red", "green"] * (N // 2)
    frame.to_parquet(tmp_path / "t.parquet")
    _expect(
        DataSettings(dataset=str(tmp_path / "t.parquet"), label_column="species"),
        "column 'colour' is not numeric",
    )
    import datasets

    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))
    _expect(
        DataSettings(dataset=str(tmp_path / "saved"), label_column="species"),
        "column 'colour' is not numeric",
    )


def test_labels_with_one_value_or_missing_values(tmp_path: Path) -> None:
    np.savez(tmp_path / "one.npz", x=np.zeros((10, 2)), y=np.zeros(10))
    _expect(DataSettings(dataset=str(tmp_path / "one.npz"), sites=1), "at least 2 distinct")
    frame = _table()
    frame["species"] = frame["species"].astype(object)
    frame.loc[5, "species"] = None
    frame.to_csv(tmp_path / "t.csv", index=False)
    _expect(DataSettings(dataset=str(tmp_path / "t.csv"), label_column="species"), "missing values")


def test_ragged_arrays_in_saved_dataset(tmp_path: Path) -> None:
    import datasets

    vectors = [[1.0, 2.0], [3.0]] * 10
    datasets.Dataset.from_dict({"v": vectors, "label": [0, 1] * 10}).save_to_disk(
        str(tmp_path / "ragged")
    )
    _expect(DataSettings(dataset=str(tmp_path / "ragged"), sites=1), "different shapes")


def test_malformed_csv_gives_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("a,b,label\n1,2,0\n1,2,3,4,5\n3,4,1\n")
    _expect(DataSettings(dataset=str(tmp_path / "bad.csv"), sites=1), "cannot read")


def test_labels_of_mixed_types_or_pickled_arrays(tmp_path: Path) -> None:
    from fedcore.data.arrays import encode_labels

    with pytest.raises(ConfigError, match="cannot be sorted"):
        encode_labels(np.array([1, "a", 2.5], dtype=object), source="test")
    np.savez(tmp_path / "obj.npz", x=np.zeros((10, 2)), y=np.array([1, "a"] * 5, dtype=object))
    _expect(DataSettings(dataset=str(tmp_path / "obj.npz"), sites=1), "cannot read")


def test_digits_read_without_scikit_learn_equal_load_digits():
    """fedcore reads scikit-learn's digits file itself (importing scikit-learn costs seconds in
    every process); the arrays must be exactly what load_digits returns."""
    import numpy as np
    from sklearn.datasets import load_digits

    from fedcore.data.sources import _digits_arrays

    images, target = _digits_arrays()
    reference = load_digits()
    assert images.dtype == reference.images.dtype and np.array_equal(images, reference.images)
    assert target.dtype == reference.target.dtype and np.array_equal(target, reference.target)


def test_the_builtin_table_is_the_one_list_of_builtin_names():
    """A new built-in dataset is one entry in one table (issue 19): the names the settings,
    provenance and the help use are that table's keys."""
    from fedcore.data.settings import BUILTIN_DATASETS
    from fedcore.data.sources import BUILTIN_LOADERS

    assert tuple(BUILTIN_LOADERS) == BUILTIN_DATASETS
