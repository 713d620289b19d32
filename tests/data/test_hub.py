"""The ``hf:`` path through flwr_datasets.FederatedDataset, on local data directories only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedcore.data import DataSettings, load_federation, load_holdout, load_site
from fedcore.errors import ConfigError


def _write(directory: Path, splits: dict[str, int], *, seed: int = 0) -> None:
    """Parquet files named after splits; feature ``uid`` is unique over all splits."""
    directory.mkdir()
    rng = np.random.default_rng(seed)
    start = 0
    for split, rows in splits.items():
        frame = pd.DataFrame(
            {
                "uid": np.arange(start, start + rows, dtype=np.float64),
                "noise": rng.normal(size=rows),
                "label": np.array(["x", "y", "z", "w"])[rng.integers(0, 4, size=rows)],
            }
        )
        frame.to_parquet(directory / f"{split}.parquet")
        start += rows


def _uids(x: np.ndarray) -> list[int]:
    return x[:, 0].astype(int).tolist()


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "pathological"])
def test_hub_dataset_with_test_split(tmp_path: Path, partition: str) -> None:
    _write(tmp_path / "hub", {"train": 400, "test": 100})
    settings = DataSettings(
        dataset=f"hf:{tmp_path / 'hub'}",
        sites=4,
        partition=partition,  # type: ignore[arg-type]
        alpha=0.5,
        classes_per_site=2,
        seed=3,
    )
    data = load_federation(settings)
    assert data.input_shape == (2,) and data.num_classes == 4
    # The test split is the holdout; the train split is dealt to the sites, nothing twice.
    assert sorted(_uids(data.holdout.x)) == list(range(400, 500))
    site_uids = [u for s in data.sites for u in _uids(s.train.x) + _uids(s.test.x)]
    assert len(site_uids) == len(set(site_uids))
    if partition != "pathological":
        assert sorted(site_uids) == list(range(400))
    for site in data.sites:
        assert len(site.train) >= 1 and len(site.test) >= 1
        if partition == "pathological":
            assert np.unique(np.concatenate([site.train.y, site.test.y])).shape[0] == 2
    # load_site and load_holdout agree with load_federation.
    one = load_site(settings, 2)
    assert np.array_equal(one.train.x, data.sites[2].train.x)
    holdout, shape, classes = load_holdout(settings)
    assert np.array_equal(holdout.y, data.holdout.y) and shape == (2,) and classes == 4


def test_hub_labels_are_sorted_values(tmp_path: Path) -> None:
    _write(tmp_path / "hub", {"train": 200, "test": 40})
    data = load_federation(DataSettings(dataset=f"hf:{tmp_path / 'hub'}", sites=2))
    frame = pd.concat(
        [pd.read_parquet(tmp_path / "hub" / f) for f in ("train.parquet", "test.parquet")]
    )
    names = dict(zip(frame["uid"].astype(int), frame["label"], strict=True))
    order = ["w", "x", "y", "z"]
    for part in [data.holdout] + [s.train for s in data.sites]:
        for uid, code in zip(_uids(part.x), part.y.tolist(), strict=True):
            assert names[uid] == order[code]


def test_hub_dataset_without_test_split_carves_a_holdout(tmp_path: Path) -> None:
    _write(tmp_path / "hub", {"train": 300})
    settings = DataSettings(dataset=f"hf:{tmp_path / 'hub'}", sites=3, holdout_fraction=0.1)
    data = load_federation(settings)
    assert len(data.holdout) == 30
    every = _uids(data.holdout.x) + [
        u for s in data.sites for u in _uids(s.train.x) + _uids(s.test.x)
    ]
    assert sorted(every) == list(range(300))


def test_hub_is_reproducible_for_a_seed(tmp_path: Path) -> None:
    _write(tmp_path / "hub", {"train": 200, "test": 20})
    from fedcore.data import clear_cache

    def sites(seed: int) -> list[list[int]]:
        settings = DataSettings(dataset=f"hf:{tmp_path / 'hub'}", sites=3, seed=seed)
        return [_uids(s.train.x) for s in load_federation(settings).sites]

    first = sites(1)
    clear_cache()
    assert sites(1) == first
    assert sites(2) != first


def test_hub_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="names no Hugging Face dataset"):
        load_federation(DataSettings(dataset="hf:"))
    with pytest.raises(ConfigError, match="cannot load dataset 'hf:.*missing'"):
        load_federation(DataSettings(dataset=f"hf:{tmp_path / 'missing'}"))
    # Offline (see conftest): a Hub name is refused, never downloaded.
    with pytest.raises(ConfigError, match="cannot load dataset 'hf:nobody/no-such-dataset'"):
        load_federation(DataSettings(dataset="hf:nobody/no-such-dataset"))
    _write(tmp_path / "hub", {"train": 40, "test": 10})
    name = f"hf:{tmp_path / 'hub'}"
    with pytest.raises(ConfigError, match="no label column 'target'"):
        load_federation(DataSettings(dataset=name, label_column="target"))
    with pytest.raises(ConfigError, match="sites=21"):
        load_federation(DataSettings(dataset=name, sites=21))
    with pytest.raises(ConfigError, match="classes_per_site.*5"):
        load_federation(DataSettings(dataset=name, partition="pathological", classes_per_site=5))
    with pytest.raises(ConfigError, match="site_id"):
        load_site(DataSettings(dataset=name, sites=2), 2)
