"""Partitioning: nothing lost or duplicated, seeded, skewed when asked, impossible cases refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedcore.data import DataSettings, FederatedData, load_federation, load_holdout, load_site
from fedcore.data.partition import split_holdout, split_site
from fedcore.errors import ConfigError

# A small synthetic source keeps these fast; each sample carries its own index as feature 0, so
# samples can be traced through the split without relying on feature values being distinct.
SMALL: dict[str, Any] = {"dataset": "synthetic", "synthetic_samples": 600, "synthetic_classes": 6}


def _rows(data: FederatedData) -> list[np.ndarray]:
    parts = [data.holdout.x]
    for site in data.sites:
        parts += [site.train.x, site.test.x]
    return parts


def _row_keys(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(x.shape[0], -1)}


@pytest.mark.parametrize(
    "options",
    [
        {"partition": "iid"},
        {"partition": "dirichlet", "alpha": 0.3},
        {"partition": "pathological", "classes_per_site": 2, "sites": 12},
    ],
)
def test_sites_and_holdout_add_up_to_the_dataset(options: dict[str, Any]) -> None:
    settings = DataSettings(**{"dataset": "digits", "sites": 10, **options})
    data = load_federation(settings)
    assert len(data.sites) == settings.sites
    assert [site.site_id for site in data.sites] == list(range(settings.sites))
    rows = _rows(data)
    total = sum(part.shape[0] for part in rows)
    keys = [_row_keys(part) for part in rows]
    union = set().union(*keys)
    # digits has a few identical images, so compare against the distinct images of the source.
    from sklearn.datasets import load_digits

    source = load_digits().images.astype(np.float32)[:, None] / np.float32(16.0)
    assert union <= _row_keys(source)
    # 12 pathological sites cover all 10 classes (site i holds class i mod 10), so here every
    # partition uses every sample.
    assert union == _row_keys(source)
    assert total == 1797
    holdout, shape, classes = load_holdout(settings)
    assert len(holdout) == round(0.2 * 1797) and shape == (1, 8, 8) and classes == 10
    for site in data.sites:
        assert len(site.train) >= 1 and len(site.test) >= 1
        assert site.train.x.dtype == np.float32 and site.train.y.dtype == np.int64


def test_no_sample_is_lost_or_duplicated_exactly() -> None:
    """With unique features (synthetic), every sample is in exactly one place."""
    for partition in ("iid", "dirichlet"):
        settings = DataSettings(**SMALL, sites=7, partition=partition, alpha=0.5, seed=3)
        data = load_federation(settings)
        rows = np.concatenate([part.reshape(part.shape[0], -1) for part in _rows(data)])
        assert rows.shape[0] == 600
        assert np.unique(rows, axis=0).shape[0] == 600
        holdout = _row_keys(data.holdout.x)
        for site in data.sites:
            assert not holdout & _row_keys(site.train.x)
            assert not holdout & _row_keys(site.test.x)
            assert not _row_keys(site.train.x) & _row_keys(site.test.x)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "pathological"])
def test_same_seed_same_sites_other_seed_other_sites(partition: str) -> None:
    def fingerprint(seed: int) -> list[tuple[bytes, bytes]]:
        settings = DataSettings(**SMALL, sites=5, partition=partition, seed=seed)  # type: ignore[arg-type]
        data = load_federation(settings)
        return [(s.train.x.tobytes(), s.test.y.tobytes()) for s in data.sites]

    first = fingerprint(11)
    from fedcore.data import clear_cache

    clear_cache()  # recompute, not just return the cached object
    assert fingerprint(11) == first
    assert fingerprint(12) != first


def test_site_from_load_site_equals_site_in_federation() -> None:
    settings = DataSettings(sites=9, partition="dirichlet", alpha=1.0, seed=5)
    data = load_federation(settings)
    for site_id in (0, 4, 8):
        site = load_site(settings, site_id)
        assert np.array_equal(site.train.x, data.sites[site_id].train.x)
        assert np.array_equal(site.test.y, data.sites[site_id].test.y)


def _label_entropy(data: FederatedData, num_classes: int) -> float:
    """Mean entropy (bits) of the label distribution of a site."""
    values = []
    for site in data.sites:
        labels = np.concatenate([site.train.y, site.test.y])
        p = np.bincount(labels, minlength=num_classes) / labels.shape[0]
        p = p[p > 0]
        values.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(values))


def test_dirichlet_with_small_alpha_is_skewed_and_large_alpha_is_not() -> None:
    skewed = load_federation(DataSettings(sites=10, partition="dirichlet", alpha=0.1))
    even = load_federation(DataSettings(sites=10, partition="dirichlet", alpha=100.0))
    iid = load_federation(DataSettings(sites=10, partition="iid"))
    # Uniform over 10 classes is log2(10) = 3.32 bits.
    assert _label_entropy(iid, 10) > 3.2
    assert _label_entropy(even, 10) > 3.1
    assert _label_entropy(skewed, 10) < 2.3
    sizes = [len(s.train) + len(s.test) for s in skewed.sites]
    assert max(sizes) > 2 * min(sizes)


@pytest.mark.parametrize(("sites", "per_site"), [(10, 1), (10, 2), (25, 3), (4, 10)])
def test_pathological_gives_the_requested_classes_per_site(sites: int, per_site: int) -> None:
    data = load_federation(
        DataSettings(sites=sites, partition="pathological", classes_per_site=per_site)
    )
    for site in data.sites:
        labels = np.concatenate([site.train.y, site.test.y])
        assert np.unique(labels).shape[0] == per_site
    if sites >= 10:  # site i always has class i mod 10, so every class is somewhere
        seen = np.unique(np.concatenate([s.train.y for s in data.sites]))
        assert seen.tolist() == list(range(10))


def test_split_helpers_keep_both_sides_non_empty() -> None:
    holdout, rest = split_holdout(10, fraction=0.01, seed=0)
    assert holdout.shape[0] == 1 and rest.shape[0] == 9
    assert sorted(np.concatenate([holdout, rest]).tolist()) == list(range(10))
    holdout, rest = split_holdout(10, fraction=0.99, seed=0)
    assert holdout.shape[0] == 9 and rest.shape[0] == 1
    for n in (2, 3, 50):
        train, test = split_site(np.arange(n) + 100, site_id=1, test_fraction=0.9, seed=0)
        assert train.shape[0] >= 1 and test.shape[0] >= 1
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(100, 100 + n))
    with pytest.raises(ConfigError, match="site 4 has 1 sample"):
        split_site(np.arange(1), site_id=4, test_fraction=0.5, seed=0)
    with pytest.raises(ConfigError):
        split_holdout(1, fraction=0.5, seed=0)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "pathological"])
def test_more_sites_than_samples(partition: str) -> None:
    with pytest.raises(ConfigError, match="sites=5000"):
        load_federation(DataSettings(sites=5000, partition=partition))  # type: ignore[arg-type]


def test_too_many_sites_for_two_samples_each() -> None:
    # 40 samples, 8 holdout, 32 left: 16 sites of 2 fit, 17 do not.
    small: dict[str, Any] = {
        "dataset": "synthetic",
        "synthetic_samples": 40,
        "synthetic_classes": 2,
    }
    assert len(load_federation(DataSettings(**small, sites=16)).sites) == 16
    with pytest.raises(ConfigError, match="sites=17"):
        load_federation(DataSettings(**small, sites=17))


def test_unsatisfiable_dirichlet_fails_instead_of_retrying() -> None:
    """Tiny alpha over many sites leaves some site empty; it must fail, not retry forever."""
    with pytest.raises(ConfigError, match=r"alpha=0\.001") as caught:
        load_federation(DataSettings(sites=200, partition="dirichlet", alpha=0.001))
    assert "\n" not in str(caught.value)


def test_classes_per_site_above_the_number_of_classes() -> None:
    with pytest.raises(ConfigError, match="classes_per_site.*11"):
        load_federation(DataSettings(partition="pathological", classes_per_site=11))


def test_pathological_site_left_with_one_sample() -> None:
    # 24 samples outside the holdout over 2 classes; 12 one-class sites leave one with 1 sample.
    small: dict[str, Any] = {
        "dataset": "synthetic",
        "synthetic_samples": 30,
        "synthetic_classes": 2,
    }
    with pytest.raises(ConfigError, match=r"site \d+ of sites=12 got 1 sample"):
        load_federation(
            DataSettings(**small, sites=12, partition="pathological", classes_per_site=1)
        )


def test_pathological_class_wanted_by_more_sites_than_it_has_samples() -> None:
    # 3 classes of 8 samples outside the holdout; 12 sites holding all 3 need 12 per class.
    small: dict[str, Any] = {
        "dataset": "synthetic",
        "synthetic_samples": 30,
        "synthetic_classes": 3,
    }
    with pytest.raises(ConfigError, match="cannot partition into sites=12") as caught:
        load_federation(
            DataSettings(**small, sites=12, partition="pathological", classes_per_site=3)
        )
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("n", "sites"), [(10, 3), (1437, 10), (7, 7), (100, 1), (1000, 999)])
def test_iid_shards_are_flwr_datasets_iid_partitions(n, sites):
    """fedcore deals IID sites without importing flwr-datasets (seconds per process); the shards
    must be exactly those of its IidPartitioner over the same seeded order."""
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    from fedcore.data.partition import iid_shards

    rest = np.random.default_rng(n).permutation(n)
    partitioner = IidPartitioner(num_partitions=sites)
    partitioner.dataset = datasets.Dataset.from_dict({"idx": rest.astype(np.int64)})
    ours = iid_shards(rest, sites)
    assert len(ours) == sites
    for site in range(sites):
        theirs = np.asarray(partitioner.load_partition(site)["idx"], dtype=np.int64)
        assert ours[site].dtype == np.int64 and np.array_equal(ours[site], theirs)
