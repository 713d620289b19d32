"""What fedcore writes for Flower is what Flower reads: connections, run configs, node configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcore.config import resolve
from fedcore.deploy import commands as cmd
from fedcore.deploy.flwr_home import flower_env, free_port, write_connection, write_run_config
from fedcore.errors import ConfigError


def test_connection_is_read_by_flower(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    ca = tmp_path / "ca.crt"
    write_connection(
        tmp_path / "home", name="fedcore-local", address="127.0.0.1:4242", root_certificates=ca
    )
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    conn = read_superlink_connection(None)  # the default connection
    assert conn.name == "fedcore-local"
    assert conn.address == "127.0.0.1:4242"
    assert conn.root_certificates == str(ca) and not conn.insecure
    write_connection(tmp_path / "home", name="sim", address="127.0.0.1:1", root_certificates=None)
    assert read_superlink_connection("sim").insecure


def test_connection_rejects_what_flower_would(tmp_path):
    with pytest.raises(ConfigError, match="absolute"):
        write_connection(tmp_path, name="x", address="h:1", root_certificates=Path("ca.crt"))
    with pytest.raises(ConfigError, match="connection name"):
        write_connection(tmp_path, name="a b", address="h:1", root_certificates=None)


def test_run_config_file_round_trips_through_flower(tmp_path):
    from flwr.common.config import parse_config_args

    settings = resolve(
        overrides=["sites=3", "rounds=2", "synthetic.samples=123", "dataset=/d/with space.npz"]
    )
    run_config = {**settings.to_run_config(), "out": "/abs/out"}
    path = write_run_config(tmp_path / "rc.toml", run_config)
    assert parse_config_args([str(path)]) == run_config


def test_node_config_round_trips_through_flower():
    from flwr.common.config import parse_config_args

    values = {
        "partition-id": 2,
        "num-partitions": 3,
        "data-path": "/data/site 2.npz",
        "flag": True,
        "w": 0.5,
    }
    assert parse_config_args([cmd.format_node_config(values)]) == values
    with pytest.raises(ConfigError, match="double quote"):
        cmd.format_node_config({"data-path": 'a"b'})
    with pytest.raises(ConfigError, match="bare word"):
        cmd.format_node_config({"a b": 1})


def test_daemons_never_install_dependencies(tmp_path):
    bin_dir = tmp_path / "bin"
    argv = cmd.superlink_argv(
        bin_dir, host="0.0.0.0", port=9092, tls=None, node_auth=False, simulation=True
    )
    assert "--disable-runtime-dependency-installation" in argv
    node = cmd.supernode_argv(
        bin_dir,
        superlink="h:1",
        root_certificates=tmp_path / "ca",
        private_key=None,
        node_config={},
        port=1,
    )
    assert "--allow-runtime-dependency-installation" not in node
    env = flower_env(tmp_path / "home", bin_dir, base={"PATH": "/usr/bin", "HOME": "/root"})
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["PATH"].split(":")[0] == str(bin_dir)
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"


def test_free_ports_differ():
    assert len({free_port() for _ in range(5)}) >= 2
