"""A private Flower home: connections, the environment Flower's programs run in, run configs.

Flower 1.41 keeps SuperLink connections in ``$FLWR_HOME/config.toml`` (default ``~/.flwr``) as
``[superlink.NAME]`` tables with an ``address`` and either ``root-certificates`` (an absolute path)
or ``insecure = true``. ``flwr run`` also *rewrites* an app's ``pyproject.toml`` when it finds a
``[tool.flwr.federations]`` table there, so fedcore never puts connections in pyproject.toml.
``fedcore deploy-local`` points ``FLWR_HOME`` at a fresh temporary folder, so nothing in the
user's ``~/.flwr`` is read or touched; the SuperLink and SuperNodes install each run's app bundle
under ``$FLWR_HOME/apps`` there as well.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from fedcore.deploy.commands import path_with, toml_value
from fedcore.errors import ConfigError

CONFIG_FILE = "config.toml"


def write_connection(
    flwr_home: Path,
    *,
    name: str,
    address: str,
    root_certificates: Path | None,
    default: bool = True,
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` holding one connection ``name``; return the file.

    ``root_certificates=None`` writes ``insecure = true`` (a loopback simulation SuperLink only).
    An existing file is replaced. Raises :class:`ConfigError` for a name that is not a bare word
    or a relative certificate path (Flower refuses those).
    """
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ConfigError(f"connection name must be letters, digits, '-' or '_', got {name!r}")
    lines = []
    if default:
        lines += ["[superlink]", f"default = {toml_value(name, what='connection name')}", ""]
    lines += [f"[superlink.{name}]", f"address = {toml_value(address, what='SuperLink address')}"]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        if not root_certificates.is_absolute():
            raise ConfigError(
                f"root certificates must be an absolute path, got {str(root_certificates)!r}"
            )
        lines.append(
            f"root-certificates = {toml_value(str(root_certificates), what='certificate path')}"
        )
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / CONFIG_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def flower_env(
    flwr_home: Path, bin_dir: Path, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment for Flower's programs: private ``FLWR_HOME``, Flower's bin on ``PATH``,
    no telemetry, no update check (both reach the network), no per-run dependency installation."""
    env = dict(os.environ if base is None else base)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = path_with(bin_dir, env.get("PATH", ""))
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def write_run_config(path: Path, run_config: Mapping[str, bool | int | float | str]) -> Path:
    """Write a run config (dotted keys become TOML tables) for ``flwr run --run-config FILE``.

    Raises :class:`ConfigError` for a value TOML or Flower cannot carry.
    """
    top: dict[str, str] = {}
    tables: dict[str, dict[str, str]] = {}
    for key, value in run_config.items():
        head, dot, leaf = key.rpartition(".")
        rendered = toml_value(value, what=f"setting {key!r}")
        if dot:
            tables.setdefault(head, {})[leaf] = rendered
        else:
            top[key] = rendered
    lines = [f"{_key(k)} = {v}" for k, v in top.items()]
    for table, entries in tables.items():
        lines += ["", f"[{'.'.join(_key(part) for part in table.split('.'))}]"]
        lines += [f"{_key(k)} = {v}" for k, v in entries.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _key(key: str) -> str:
    return (
        key if key and all(c.isalnum() or c in "-_" for c in key) else toml_value(key, what="key")
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now (the kernel's choice). Another process may take it
    before it is used; callers that start a server on it check that the server came up."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, *, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
