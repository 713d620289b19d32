"""Keep the data tests offline and hermetic: no telemetry, no Hub, a private datasets cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Patch the module-level switches too, in case another test imported the packages first."""
    import datasets
    import flwr_datasets.common.telemetry as telemetry

    monkeypatch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(
        datasets.config, "HF_DATASETS_CACHE", Path(tmp_path_factory.getbasetemp()) / "hf-cache"
    )


@pytest.fixture
def fresh_cache() -> Iterator[None]:
    """Empty fedcore.data's per-process caches before and after a test."""
    from fedcore.data import clear_cache

    clear_cache()
    yield
    clear_cache()
