"""Settings: schema, TOML, --set, Flower run config, and the pyproject mirror."""

import tomllib
from pathlib import Path

import pytest

from fedcore import config as cfg
from fedcore.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_app_config_lists_every_setting_with_its_default():
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"
    ]
    assert cfg.flatten_mapping(app_config) == cfg.Settings().to_run_config()


def test_issue_keys_exist():
    for key in (
        "sites",
        "rounds",
        "dataset",
        "partition",
        "alpha",
        "model",
        "local_epochs",
        "batch_size",
        "lr",
        "strategy",
        "seed",
    ):
        assert key in cfg.SPECS


def test_toml_tables_and_dotted_keys_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("sites = 4\nlr = 1\n[synthetic]\nsamples = 300\n")
    settings = cfg.resolve(
        file=path, overrides=["synthetic.classes=3", "rounds=7", "partition=dirichlet"]
    )
    assert (settings.sites, settings.rounds, settings.lr) == (4, 7, 1.0)
    assert isinstance(settings.lr, float)
    assert (settings.synthetic.samples, settings.synthetic.classes) == (300, 3)
    assert settings.partition == "dirichlet"


def test_run_config_round_trip():
    settings = cfg.resolve(overrides=["sites=3", "model=cnn", "synthetic.features=7"])
    assert cfg.from_run_config(settings.to_run_config()) == settings
    # Keys Flower adds on its own are ignored.
    assert cfg.from_run_config({**settings.to_run_config(), "flwr-extra": 1}) == settings


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("sitez=3", "unknown setting 'sitez' (did you mean 'sites'?)"),
        ("rounds=0", "'rounds' must be >= 1, got 0"),
        ("rounds=ten", "'rounds' must be an integer, got 'ten'"),
        ("lr=nan", "'lr' must be a finite number"),
        ("partition=random", "'partition' must be one of iid, dirichlet, pathological"),
        ("fraction_train=1.5", "'fraction_train' must be <= 1"),
        ("no-equals-sign", "--set expects key=value"),
    ],
)
def test_bad_overrides_name_key_and_value(override, fragment):
    with pytest.raises(ConfigError) as info:
        cfg.resolve(overrides=[override])
    assert fragment in str(info.value)


def test_toml_values_are_not_parsed_from_text(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = "3"\n')
    with pytest.raises(ConfigError, match="'rounds' must be an integer"):
        cfg.resolve(file=path)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        cfg.resolve(file=tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("sites = = 3")
    with pytest.raises(ConfigError, match="could not be read"):
        cfg.resolve(file=broken)


def test_describe_lists_every_key():
    text = cfg.describe()
    assert all(key in text for key in cfg.SPECS)


def test_run_config_missing_keys_is_refused_not_defaulted():
    partial = cfg.Settings().to_run_config()
    del partial["sites"]
    with pytest.raises(ConfigError, match="lacks 1 fedcore setting"):
        cfg.from_run_config(partial)
    with pytest.raises(ConfigError, match="lacks"):
        cfg.from_run_config({})
