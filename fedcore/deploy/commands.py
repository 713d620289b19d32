"""Command lines of Flower 1.41's deployment engine, built in one place.

``fedcore deploy-local`` runs these, ``fedcore certs`` prints them, and docs/deployment.md shows
them; building them here keeps the three in step. Every function returns an argv list (or, for
printing, a shell-quoted line) and starts nothing.

The flags are Flower 1.41's (``flower-superlink --help``):

- SuperLink: one port for every API (``--host``, ``--port``); TLS with ``--ssl-certfile``,
  ``--ssl-keyfile``, ``--ssl-ca-certfile``; ``--enable-supernode-auth`` admits registered nodes
  only; ``--disable-runtime-dependency-installation`` stops the ServerApp (and, in simulation, the
  simulation process) from running ``uv sync`` on the app's dependencies for every run, which would
  install a second torch (a CUDA build) next to the one in the environment.
- SuperNode: ``--superlink host:port``, ``--root-certificates`` (verifies the SuperLink; there is no
  mutual TLS), ``--auth-supernode-private-key``, ``--node-config``, and ``--port`` for its local
  ClientApp runtime API (default 9094, so two SuperNodes on one host need two ports). A SuperNode
  does not install dependencies unless given ``--allow-runtime-dependency-installation``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedcore.errors import ConfigError

NodeValue = bool | int | float | str

FLOWER_PROGRAMS = ("flower-superlink", "flower-supernode", "flwr", "flower-superexec")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The SuperLink's TLS files (PEM)."""

    ca_certificate: Path
    certificate: Path
    key: Path


def flower_bin_dir() -> Path:
    """The folder holding Flower's programs: this interpreter's ``bin``, else the one on PATH.

    Flower starts ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name, so
    this folder must also be on the daemons' PATH (:func:`fedcore.deploy.flwr_home.flower_env`).
    Raises :class:`ConfigError` if Flower's programs are nowhere to be found.
    """
    here = Path(sys.executable).parent
    if (here / "flower-superlink").exists():
        return here
    found = shutil.which("flower-superlink")
    if found is None:
        raise ConfigError(
            "cannot find flower-superlink next to this Python nor on PATH; install fedcore's "
            "environment (make setup) and run fedcore from it"
        )
    return Path(found).parent


def superlink_argv(
    bin_dir: Path,
    *,
    host: str,
    port: int,
    tls: TlsFiles | None,
    node_auth: bool,
    database: Path | None = None,
    simulation: bool = False,
) -> list[str]:
    """``flower-superlink`` serving everything on ``host:port``, never installing dependencies.

    ``tls=None`` means ``--insecure`` (only for a simulation SuperLink on loopback).
    """
    argv = [str(bin_dir / "flower-superlink"), "--host", host, "--port", str(port)]
    if tls is None:
        argv.append("--insecure")
    else:
        argv += [
            "--ssl-ca-certfile", str(tls.ca_certificate),
            "--ssl-certfile", str(tls.certificate),
            "--ssl-keyfile", str(tls.key),
        ]  # fmt: skip
    if node_auth:
        argv.append("--enable-supernode-auth")
    if simulation:
        argv.append("--simulation")
    if database is not None:
        argv += ["--database", str(database)]
    argv.append("--disable-runtime-dependency-installation")
    return argv


def supernode_argv(
    bin_dir: Path,
    *,
    superlink: str,
    root_certificates: Path,
    private_key: Path | None,
    node_config: Mapping[str, NodeValue],
    port: int,
    host: str = "127.0.0.1",
    max_retries: int | None = None,
) -> list[str]:
    """``flower-supernode`` for one site (TLS always on; node auth if ``private_key`` is given)."""
    argv = [
        str(bin_dir / "flower-supernode"),
        "--superlink", superlink,
        "--root-certificates", str(root_certificates),
        "--node-config", format_node_config(node_config),
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip
    if private_key is not None:
        argv += ["--auth-supernode-private-key", str(private_key)]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    return argv


def register_argv(
    bin_dir: Path, *, public_key: Path, connection: str, name: str | None = None
) -> list[str]:
    """``flwr supernode register KEY.pub CONNECTION`` (run by the federation's operator)."""
    argv = [str(bin_dir / "flwr"), "supernode", "register", str(public_key), connection]
    if name:
        argv += ["--name", name]
    return argv


def run_argv(
    bin_dir: Path, *, app_dir: Path, connection: str, run_config: Path, stream: bool = True
) -> list[str]:
    """``flwr run APP CONNECTION --run-config FILE.toml [--stream]``."""
    argv = [str(bin_dir / "flwr"), "run", str(app_dir), connection, "--run-config", str(run_config)]
    if stream:
        argv.append("--stream")
    return argv


def format_node_config(values: Mapping[str, NodeValue]) -> str:
    """``{"partition-id": 0, "data-path": "/d/x.npz"}`` -> ``partition-id=0 data-path="/d/x.npz"``.

    Flower parses each ``key=value`` as TOML and splits on spaces outside quotes. Raises
    :class:`ConfigError` for a key with spaces or ``=``, a non-finite number, or a string holding a
    double quote (Flower's parser cannot carry one).
    """
    parts = []
    for key, value in values.items():
        if not key or any(c.isspace() or c in "=\"'" for c in key):
            raise ConfigError(
                f"node config key {key!r} must be a bare word (no spaces, quotes or '=')"
            )
        parts.append(f"{key}={toml_value(value, what=f'node config {key!r}')}")
    return " ".join(parts)


def toml_value(value: NodeValue, *, what: str) -> str:
    """A TOML literal for a scalar. Raises :class:`ConfigError` for what Flower cannot carry."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{what} must be finite, got {value!r}")
        return repr(value)
    if isinstance(value, str):
        if '"' in value or "\n" in value:
            raise ConfigError(f"{what} must not hold a double quote or a newline, got {value!r}")
        return json.dumps(value)
    raise ConfigError(f"{what} must be a bool, int, float or string, got {value!r}")


def shell_line(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, short: bool = True
) -> str:
    """``argv`` as a line to paste into a shell; with ``short``, Flower programs by bare name."""
    words = [
        Path(argv[0]).name if short and Path(argv[0]).name in (*FLOWER_PROGRAMS,) else argv[0],
        *argv[1:],
    ]
    prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
    return prefix + " ".join(shlex.quote(w) for w in words)


def path_with(bin_dir: Path, path: str | None = None) -> str:
    """``PATH`` with ``bin_dir`` first (Flower starts its helper programs by name)."""
    rest = path if path is not None else os.environ.get("PATH", "")
    return os.pathsep.join(
        [str(bin_dir), *[p for p in rest.split(os.pathsep) if p and p != str(bin_dir)]]
    )
