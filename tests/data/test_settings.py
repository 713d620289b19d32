"""DataSettings: every bad value gives a one-line ConfigError naming the value given."""

from __future__ import annotations

from typing import Any

import pytest

from fedcore.data import DataSettings, load_site
from fedcore.errors import ConfigError, FedcoreError


def test_defaults_are_valid_and_hashable() -> None:
    settings = DataSettings()
    assert settings.dataset == "digits" and settings.sites == 10 and settings.partition == "iid"
    assert hash(settings) == hash(DataSettings())
    assert settings != DataSettings(seed=1)
    with pytest.raises(AttributeError):
        settings.sites = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("sites", 0, "0"),
        ("sites", -3, "-3"),
        ("sites", 2.5, "2.5"),
        ("sites", "10", "'10'"),
        ("sites", True, "True"),
        ("partition", "shards", "'shards'"),
        ("alpha", 0.0, "0.0"),
        ("alpha", -1.0, "-1.0"),
        ("alpha", float("nan"), "nan"),
        ("alpha", float("inf"), "inf"),
        ("classes_per_site", 0, "0"),
        ("seed", -1, "-1"),
        ("test_fraction", 0.0, "0.0"),
        ("test_fraction", 1.0, "1.0"),
        ("test_fraction", 1.5, "1.5"),
        ("holdout_fraction", 0, "0"),
        ("holdout_fraction", 1, "1"),
        ("holdout_fraction", -0.2, "-0.2"),
        ("dataset", "", "''"),
        ("dataset", 3, "3"),
        ("label_column", None, "None"),
        ("synthetic_samples", 0, "0"),
        ("synthetic_features", 0, "0"),
        ("synthetic_classes", 1, "1"),
    ],
)
def test_bad_value_is_refused_with_its_name_and_value(field: str, value: Any, shown: str) -> None:
    with pytest.raises(ConfigError) as caught:
        DataSettings(**{field: value})
    message = str(caught.value)
    assert field in message and shown in message
    assert "\n" not in message
    assert isinstance(caught.value, FedcoreError)


@pytest.mark.parametrize("site_id", [-1, 4, 100, 1.0, "0", None, True])
def test_site_id_out_of_range_or_of_wrong_type(site_id: Any) -> None:
    with pytest.raises(ConfigError, match="site_id"):
        load_site(DataSettings(sites=4), site_id)
