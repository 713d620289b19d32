"""The run-wide data cache (``FEDCORE_DATA_CACHE``): the other processes of a run read the plan
the first one built, identical to building it, and never for other settings."""

import numpy as np
import pytest

from fedcore.data import federation
from fedcore.data.settings import DataSettings


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(federation.DATA_CACHE_ENV, str(tmp_path))
    federation.clear_cache()
    yield tmp_path
    federation.clear_cache()


def _sites(settings):
    return [federation.load_site(settings, s) for s in range(settings.sites)]


def test_a_later_process_reads_the_same_sites_without_building_them(cache, monkeypatch):
    settings = DataSettings(dataset="synthetic", sites=5, partition="dirichlet", alpha=0.5, seed=4)
    first = _sites(settings)
    holdout = federation.load_holdout(settings)
    assert len(list(cache.glob("plan-*.npz"))) == 1
    federation.clear_cache()  # as a fresh process would start

    def no_source(_settings):
        raise AssertionError("the source was loaded again instead of read from the cache")

    monkeypatch.setattr(federation, "load_source", no_source)
    again = _sites(settings)
    for a, b in zip(first, again, strict=True):
        for split in ("train", "test"):
            assert np.array_equal(getattr(a, split).x, getattr(b, split).x)
            assert np.array_equal(getattr(a, split).y, getattr(b, split).y)
    new_holdout = federation.load_holdout(settings)
    assert np.array_equal(holdout[0].x, new_holdout[0].x) and holdout[1:] == new_holdout[1:]


def test_other_settings_never_read_a_plan_made_for_different_ones(cache):
    a = DataSettings(dataset="synthetic", sites=5, seed=4)
    b = DataSettings(dataset="synthetic", sites=5, seed=5)
    sites_a = _sites(a)
    sites_b = _sites(b)
    assert len(list(cache.glob("plan-*.npz"))) == 2
    assert not np.array_equal(sites_a[0].train.x, sites_b[0].train.x)


def test_a_damaged_cache_file_is_rebuilt_not_trusted(cache):
    settings = DataSettings(dataset="synthetic", sites=3, seed=1)
    first = _sites(settings)
    (path,) = cache.glob("plan-*.npz")
    path.write_bytes(b"not an npz")
    federation.clear_cache()
    again = _sites(settings)
    assert all(np.array_equal(a.train.x, b.train.x) for a, b in zip(first, again, strict=True))
