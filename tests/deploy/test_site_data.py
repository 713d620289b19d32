"""A site's data from its node config: a partition of the run's dataset, or a site-local file."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedcore.config import resolve
from fedcore.data import load_site
from fedcore.errors import ConfigError
from fedcore.federation.site.data import class_ids, data_settings, site_data


@pytest.fixture
def settings():
    return resolve(overrides=["sites=3", "test_fraction=0.25", "seed=7"])


def test_partition_id_is_the_simulation_split(settings):
    got = site_data(settings, {"partition-id": 1, "num-partitions": 3})
    want = load_site(data_settings(settings), 1)
    assert got is want


def test_num_partitions_must_match_sites(settings):
    with pytest.raises(ConfigError, match="num-partitions=4.*sites=3"):
        site_data(settings, {"partition-id": 1, "num-partitions": 4})


@pytest.mark.parametrize(
    "config", [{}, {"partition-id": "one"}, {"partition-id": 3}, {"partition-id": True}]
)
def test_bad_node_config_is_a_config_error(settings, config):
    with pytest.raises(ConfigError):
        site_data(settings, config)


def _npz(path, labels, features=4):
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((len(labels), features)), y=np.asarray(labels))
    return str(path)


def test_local_npz_integer_labels_are_class_ids(settings, tmp_path):
    # This site lacks class 0 and 2: its labels must keep their ids, not be re-encoded to 0..1.
    labels = [1, 3] * 20
    site = site_data(settings, {"data-path": _npz(tmp_path / "s.npz", labels), "partition-id": 4})
    assert site.site_id == 4
    assert len(site.train) + len(site.test) == 40 and len(site.test) == 10
    assert set(np.concatenate([site.train.y, site.test.y]).tolist()) == {1, 3}
    assert site.train.x.dtype == np.float32 and site.train.x.shape[1:] == (4,)


def test_local_csv_with_label_classes(settings, tmp_path):
    frame = pd.DataFrame(
        {"a": np.arange(30.0), "b": np.ones(30), "label": ["malignant", "benign", "x"] * 10}
    )
    frame.to_csv(tmp_path / "s.csv", index=False)
    config = {"data-path": str(tmp_path / "s.csv"), "label-classes": "benign, malignant, x"}
    site = site_data(settings, config)
    raw = dict(zip(frame["a"], frame["label"], strict=True))
    order = ["benign", "malignant", "x"]
    for split in (site.train, site.test):
        for row, y in zip(split.x, split.y, strict=True):
            assert order[y] == raw[float(row[0])]


def test_local_parquet_and_unknown_label(settings, tmp_path):
    frame = pd.DataFrame({"f": np.arange(20.0), "label": ["cat", "dog"] * 10})
    frame.to_parquet(tmp_path / "s.parquet")
    with pytest.raises(ConfigError, match="not integer class ids"):
        site_data(settings, {"data-path": str(tmp_path / "s.parquet")})
    with pytest.raises(ConfigError, match=r"\['dog'\], not in label-classes"):
        site_data(settings, {"data-path": str(tmp_path / "s.parquet"), "label-classes": "cat,bird"})


def test_class_ids_rules():
    assert class_ids(np.array([0.0, 2.0]), None, source="s").tolist() == [0, 2]
    assert class_ids(np.array([3, 1]), ("1", "3"), source="s").tolist() == [1, 0]
    with pytest.raises(ConfigError, match=">= 0"):
        class_ids(np.array([-1, 2]), None, source="s")
    with pytest.raises(ConfigError):
        class_ids(np.array([0.5, 1.0]), None, source="s")
    with pytest.raises(ConfigError):
        class_ids(np.zeros((2, 2)), None, source="s")


@pytest.mark.parametrize("value", ["a", "a,a", "a,,b", 3])
def test_bad_label_classes(settings, tmp_path, value):
    with pytest.raises(ConfigError, match="label-classes"):
        site_data(
            settings, {"data-path": _npz(tmp_path / "s.npz", [0, 1] * 5), "label-classes": value}
        )


def test_missing_or_unreadable_file(settings, tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        site_data(settings, {"data-path": str(tmp_path / "absent.npz")})
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="cannot read"):
        site_data(settings, {"data-path": str(tmp_path / "bad.npz")})
    (tmp_path / "s.txt").write_text("1,2")
    with pytest.raises(ConfigError, match="unsupported type"):
        site_data(settings, {"data-path": str(tmp_path / "s.txt")})
    with pytest.raises(ConfigError, match="at least"):
        site_data(settings, {"data-path": _npz(tmp_path / "tiny.npz", [0])})


def test_changed_file_is_reread(settings, tmp_path):
    path = _npz(tmp_path / "s.npz", [0, 1] * 10)
    first = site_data(settings, {"data-path": path})
    assert site_data(settings, {"data-path": path}) is first
    import os

    _npz(tmp_path / "s.npz", [0, 1] * 15)
    os.utime(path, ns=(1, 1))
    assert (
        len(site_data(settings, {"data-path": path}).train)
        + len(site_data(settings, {"data-path": path}).test)
        == 30
    )


def test_site_csv_with_text_feature_is_refused_like_the_simulation(settings, tmp_path):
    # The site used to read CSV/Parquet with its own copy of the reader, which skipped the
    # numeric-column check; now both read through fedcore.data.sources.read_local.
    from fedcore.data import DataSettings, load_federation

    frame = pd.DataFrame(
        {"a": np.arange(30.0), "colour": ["red", "green", "blue"] * 10, "label": [0, 1, 2] * 10}
    )
    path = tmp_path / "s.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(ConfigError, match="column 'colour' is not numeric") as at_site:
        site_data(settings, {"data-path": str(path)})
    with pytest.raises(ConfigError, match="column 'colour' is not numeric") as in_simulation:
        load_federation(DataSettings(dataset=str(path), sites=2))
    assert str(at_site.value).split(": ", 1)[1] == str(in_simulation.value).split(": ", 1)[1]
