"""The main job's data (digits, default partition and seed) must not change under refactoring."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fedcore.config import Settings
from fedcore.data import DataSettings, load_site
from fedcore.federation.site.data import site_data

# Computed on the untouched code (commit 76f4d40, before the data readers were shared) with the
# same hash as `_train_digest` below: dtype, shape and bytes of train.x then train.y.
PINNED = {
    0: "fff394fedc1bb087a7ae2bb5c24d0d937da4fc24b92b1bef58062f4b9f4d822b",
    9: "84f9dc3d31f2e67ec2f51731f5b3418222ae0da227285d9b16a7a112c209eaa4",
}


def _train_digest(x: np.ndarray, y: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in (x, y):
        digest.update(str(array.dtype).encode())
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("site_id", sorted(PINNED))
def test_main_job_site_training_arrays_are_pinned(site_id: int) -> None:
    simulated = load_site(DataSettings(), site_id)
    deployed = site_data(Settings(), {"partition-id": site_id})
    for site in (simulated, deployed):
        assert _train_digest(site.train.x, site.train.y) == PINNED[site_id]
