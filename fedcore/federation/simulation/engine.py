"""Run a federation on Flower's simulation engine (Ray), in this process.

Design: many sites per simulated node (issue 13)
------------------------------------------------
A Flower message costs far more than a small site's training (Ray scheduling, serialization,
polling): with one Flower node per site, over 90 percent of a round at 1,000 sites was messaging.
So the simulation starts *fewer Flower nodes than sites*: ``simulation.sites_per_node`` sites per
node (0, the default: ``ceil(sites / workers)``, workers = CPUs / ``client_cpus``, so one node per
Ray worker), still on Flower's Message API and simulation engine
(:mod:`fedcore.federation.simulation.batched`):

- **Server.** :func:`~fedcore.federation.simulation.batched.grid_for` wraps Flower's Grid in a
  ``BatchedGrid`` that shows one *virtual node* per site (id ``site + 1``). The strategy samples
  virtual nodes (``fraction_train``; Poisson sampling under DP-FedAvg), the driver builds and
  checks per-site messages, exactly as with one node per site. Only at the wire are the messages
  for the sites one Flower node plays packed into one (the global model once, each site's own
  records by reference), and the node's one reply is split back into per-site replies that look
  as if each site had answered itself. Everything after that is unchanged: the reply checks,
  per-site failures and timeouts in the record (a node that does not answer in time fails each of
  its sites), the strategy. Site ``s`` is played by the ``s % nodes``-th node for the whole run.
- **Node.** The ClientApp's handlers see a batched request and run the *same* per-site handler
  (``train_round`` / ``evaluate_round`` of :mod:`fedcore.federation.site.rounds`) for each named site in
  turn, with the node config the site's own node would have (``partition-id = s``), so per-site
  record-level ledgers, batch seeds and DP-SGD are those of the one-site path. A site's data is
  loaded when it trains and released after. A deployed site refuses a batched request: deployment
  is unchanged, one SuperNode per real site.
- **Secure aggregation** (issue 24) runs batched too: each stage is one message per node, and a
  node plays each of its sites as a separate party, with the site's own node id, key, journal,
  ledger and state record (kept in the node's ``context.state`` under ``s<site>.``); the server's
  protocol code sees per-site messages as with one node per site. A stage's deadline grows with
  the sites one worker answers in turn (:mod:`fedcore.federation.simulation.deadlines`).
- **Across machines**: with ``ray_address`` the run joins an existing Ray cluster
  (:func:`connect_ray`) and its workers run on every machine of it; the cluster's CPUs count for
  ``sites_per_node``.
- **Per round, nothing waits on a timer.** Flower's engine polls for instructions and replies
  every 0.1 s; inside :func:`simulate` its two loops are woken by events instead
  (:mod:`fedcore.federation.simulation.delivery`). A node decodes the global model its sites share once
  (:func:`fedcore.federation.messages.decoded_once`) and the server splits a node's reply in
  one pass. Past :data:`~fedcore.federation.simulation.batched.MAX_AUTO_SITES_PER_NODE` sites a node, the
  automatic setting starts more nodes, so that no message in flight holds thousands of sites.
- **The server's torch runs on ``client_cpus`` threads** (:func:`server_threads`): the ServerApp
  shares this machine's CPUs with the workers, and its central evaluation and aggregate are a
  site's size of work, which torch's one-thread-per-core default made wait on busy cores.
- ``simulation.sites_per_node = 1`` is the one-site-per-node path, kept for fidelity checks; for a
  deterministic configuration both give the same global model up to float error
  (``tests/federation/test_batched.py``).

The app is loaded the way ``flwr run`` loads it: Flower imports ``server.app:app`` and
``clients.app:app`` from the *app directory* (the folder whose ``pyproject.toml`` declares them),
in this process for the ServerApp and in each Ray worker for the ClientApps. fedcore itself never
imports them; :func:`find_app_dir` locates the folder.

Settings reach both apps as Flower's run config (the same route as ``flwr run --run-config``),
through ``flwr.simulation.run_simulation._run_simulation``, the function behind the deprecated
public ``run_simulation``: the public one has no way to pass a run config or an app directory.
flwr is pinned to 1.41.0, and the end-to-end test covers this call.

Ray, deliberately:

- each site reserves ``client_cpus`` CPUs and ``client_gpus`` of a GPU (Flower's default of 2 CPUs
  would run one site at a time on a 2-core machine), and torch in a worker uses that many threads;
- Ray's memory monitor is off (``RAY_memory_monitor_refresh_ms=0``) unless the user set it: it reads
  the whole machine's memory and kills workers for an unrelated process's usage, and a killed worker
  made rounds halt silently. A worker that dies anyway costs only its site: every exchange has a
  deadline (``round_timeout``) after which the driver counts the site as failed and goes on;
- Flower's telemetry is off (``FLWR_TELEMETRY_ENABLED=0``) unless the user set it.

``fedcore simulate`` runs all of this in a child process (:func:`child_argv`, ``python -m
fedcore.federation.simulation.engine``), started *before* its checks so that the child's imports (torch,
Flower, Ray: seconds) overlap them; the child waits for a go (a file in a handshake folder,
:data:`HANDSHAKE_ENV`) before it runs anything, and is killed instead if a check fails. Once the
ServerApp has closed the record the child says so (:func:`run_finished`) and the parent stops it
and Ray at once. The child runs in a session of its own, so that a signal reaches only the
``fedcore`` process, which then stops the child and everything it started (Ray's daemons and
workers are its descendants) and closes the run record itself. The child has the working
directory on its import path, and hands it to Ray's workers through ``PYTHONPATH``, so a model
given as ``package.module:callable`` next to the user's files is found as with ``python -m``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import tomllib
import traceback
from pathlib import Path

import fedcore
from fedcore.config import Settings
from fedcore.errors import ConfigError
from fedcore.federation.site.folders import SIMULATION_MARKER

SERVER_APP = "server.app:app"
CLIENT_APP = "clients.app:app"


# The fedcore package's folder, wherever this module sits inside it.
_PACKAGE = Path(fedcore.__file__).resolve().parent


def find_app_dir(start: Path | None = None) -> Path:
    """The fedcore app directory: :func:`declared_app_dir`, else the app installed with fedcore
    (:func:`installed_app_dir`)."""
    if (declared := declared_app_dir(start)) is not None:
        return declared
    if (installed := installed_app_dir()) is not None:
        return installed
    raise ConfigError(
        "cannot find the fedcore app directory (a pyproject.toml declaring "
        f"serverapp = {SERVER_APP!r}); run from the fedcore checkout or set FEDCORE_APP_DIR"
    )


def declared_app_dir(start: Path | None = None) -> Path | None:
    """``$FEDCORE_APP_DIR``, else the checkout this library lives in, else the first folder from
    ``start`` (default: the working directory) upwards, whose ``pyproject.toml`` declares fedcore's
    components; None if none does. Creates nothing."""
    candidates: list[Path] = []
    if env := os.environ.get("FEDCORE_APP_DIR"):
        candidates.append(Path(env))
    candidates.append(_PACKAGE.parent)  # the checkout the library lives in
    here = (start or Path.cwd()).resolve()
    candidates += [here, *here.parents]
    return next((folder for folder in candidates if _declares_app(folder)), None)


def installed_app_dir() -> Path | None:
    """An app directory for an installed fedcore, or None in a checkout.

    setup.py installs the checkout's ``clients`` and ``server`` packages as ``fedcore/_app/``.
    Flower wants them in a folder with a ``pyproject.toml`` declaring the app, so this makes one,
    temporary (removed when this process exits): links to the two packages and a pyproject whose
    ``[tool.flwr.app.config]`` is :class:`Settings`' defaults.
    """
    installed = _PACKAGE / "_app"
    if not all((installed / part / "app.py").is_file() for part in ("server", "clients")):
        return None
    import atexit
    import shutil
    import tempfile

    from fedcore.deploy.flwr_home import write_run_config

    folder = Path(tempfile.mkdtemp(prefix="fedcore-app-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for part in ("server", "clients"):
        (folder / part).symlink_to(installed / part, target_is_directory=True)
    config = {f"tool.flwr.app.config.{k}": v for k, v in Settings().to_run_config().items()}
    write_run_config(folder / "config.toml", config)
    head = (
        '[project]\nname = "fedcore-app"\nversion = "0.1.0"\n\n[tool.flwr.app]\n'
        'publisher = "fedcore"\n\n[tool.flwr.app.components]\n'
        f'serverapp = "{SERVER_APP}"\nclientapp = "{CLIENT_APP}"\n\n'
    )
    (folder / "pyproject.toml").write_text(head + (folder / "config.toml").read_text())
    return folder


def _declares_app(folder: Path) -> bool:
    try:
        data = tomllib.loads((folder / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    components = data.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    return components.get("serverapp") == SERVER_APP and components.get("clientapp") == CLIENT_APP


def backend_config(settings: Settings, *, verbose: bool = False) -> dict:
    """Ray's resources; the workers' output reaches the console only with ``verbose`` (Flower's
    and absl's warnings from every worker otherwise bury the progress lines). On an existing
    cluster (``ray_address``) the cluster's own CPUs count."""
    if settings.ray_address:
        return {
            "client_resources": {
                "num_cpus": settings.client_cpus,
                "num_gpus": settings.client_gpus,
            },
            "init_args": {"address": settings.ray_address, "log_to_driver": verbose},
        }
    return {
        "client_resources": {"num_cpus": settings.client_cpus, "num_gpus": settings.client_gpus},
        "init_args": {
            # A cluster of our own, never one that `ray start` left on this machine: without
            # ray_address, ray.init() would otherwise join whatever /tmp/ray names.
            "address": "local",
            "num_cpus": max(os.cpu_count() or 1, int(settings.client_cpus)),
            "include_dashboard": False,
            "log_to_driver": verbose,
        },
    }


def simulate(
    settings: Settings, *, out_dir: Path, app_dir: Path | None = None, verbose: bool = False
) -> None:
    """Run the federation; the ServerApp writes the run record into ``out_dir``.

    Raises what the ServerApp raised (a :class:`~fedcore.errors.FedcoreError` for bad input).
    """
    import torch

    from fedcore.federation.simulation.batched import NODES_ENV, WORKERS_ENV, node_count, workers
    from fedcore.federation.simulation.delivery import prompt_delivery

    cpus = connect_ray(settings.ray_address, verbose=verbose) if settings.ray_address else None
    nodes = node_count(settings, cpus)
    saved = {name: os.environ.get(name) for name in (NODES_ENV, WORKERS_ENV)}
    os.environ[NODES_ENV] = str(nodes)  # the ServerApp (this process) plays sites on the nodes
    os.environ[WORKERS_ENV] = str(workers(settings, cpus))  # how many nodes run at once
    threads = torch.get_num_threads()
    torch.set_num_threads(server_threads(settings))
    try:
        with prompt_delivery():  # no 0.1 s polls between the Grid and the engine
            run_app(
                app_dir or find_app_dir(),
                server_app=SERVER_APP,
                client_app=CLIENT_APP,
                run_config={**settings.to_run_config(), "out": str(out_dir)},
                sites=nodes,
                backend=backend_config(settings, verbose=verbose),
                verbose=verbose,
            )
    finally:
        torch.set_num_threads(threads)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def server_threads(settings: Settings) -> int:
    """The torch threads of the ServerApp in simulation: those of one site (``client_cpus``).

    The ServerApp runs in the simulation's own process, on the CPUs that Ray's workers train the
    sites on, and its work is a site's size (the central evaluation, the aggregate). torch's
    default, one thread per core, makes every small operation wait for threads that the workers
    (or anything else on the machine) hold: the MLP's central evaluation on the synthetic
    benchmark's 1,500 held-out examples took 15-55 ms with 2 threads on this 2-core machine under
    load, 0.5 ms with one."""
    return max(1, int(settings.client_cpus))


def connect_ray(address: str, *, verbose: bool = False) -> int:
    """Join the existing Ray cluster at ``address`` for this run; return the cluster's CPUs.

    Flower initialises Ray only when it is not yet initialised, so joining here first lets the
    job's workers, on every machine of the cluster, get what a worker started by this process
    would inherit: the import path (the app, fedcore, a model next to the user's files), the
    simulation marker (sites keep their state under the run record; a node may play many sites)
    and telemetry off. Raises :class:`ConfigError` if the cluster cannot be reached."""
    import ray

    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {
        "PYTHONPATH": pythonpath,
        SIMULATION_MARKER: "1",
        "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
    }
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=verbose)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot join the Ray cluster at ray_address={address!r}: {exc}") from exc
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_app(
    app_dir: Path,
    *,
    server_app: str,
    client_app: str,
    run_config: dict,
    sites: int,
    backend: dict,
    verbose: bool = False,
) -> None:
    """Run any Flower app (``module:attr`` references inside ``app_dir``) on the simulation engine,
    with ``run_config`` given to the ServerApp and every ClientApp."""
    _engine_environment()
    from flwr.app import Context, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    # The same Run that _run_simulation builds when given none, plus our run config.
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = run_config
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(
        run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    _run_simulation(
        num_supernodes=sites,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app_attr=client_app,
        server_app_attr=server_app,
        server_app_context=context,
        app_dir=str(app_dir),
        run=run,
        backend_config=backend,
        verbose_logging=verbose,
        # As `flwr run` does: with is_app=False, Flower gives the ClientApps an empty run config.
        is_app=True,
    )


def _engine_environment() -> None:
    """The environment Flower and Ray read (some when they are imported)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ[SIMULATION_MARKER] = "1"  # sites may keep their state under the run record
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def child_argv(settings: Settings, *, out_dir: Path, verbose: bool) -> list[str]:
    """The command that runs :func:`simulate` for ``settings`` in a child process."""
    run_config = {**settings.to_run_config(), "out": str(out_dir)}
    return [
        sys.executable,
        "-m",
        "fedcore.federation.simulation.engine",
        json.dumps(run_config),
        *(["--verbose"] if verbose else []),
    ]


# The folder through which `fedcore simulate` and its child agree on two moments (see main()):
# GO, written by the parent once its checks passed and the record folder exists; DONE, written by
# the child once the ServerApp has closed the record.
HANDSHAKE_ENV = "FEDCORE_SIMULATION_HANDSHAKE"
GO, DONE = "go", "done"
# What the child imports while the parent checks the settings: the modules every run needs.
WARM_MODULES = (
    "ray",
    "flwr.simulation.run_simulation",
    "fedcore.federation.server.serve",
    "clients.app",
)


def run_finished() -> None:
    """Tell ``fedcore simulate`` that the ServerApp has closed the run record: it then stops this
    process and Ray at once (SIGKILL; nothing in them needs a clean exit) rather than waiting
    seconds for Flower to stop its actors and Ray to shut down. Nothing outside the simulation."""
    if folder := os.environ.get(HANDSHAKE_ENV):
        with contextlib.suppress(OSError):
            (Path(folder) / DONE).touch()


def _await_go(folder: Path) -> None:
    """Import what the run needs, then wait for the parent's go (it kills this process instead
    if its checks fail, and the kernel does if it dies: ``die_with_parent``)."""
    import importlib

    _engine_environment()
    for name in WARM_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    while not (folder / GO).exists():
        time.sleep(0.02)


def child_env(cwd: Path | None = None, *, handshake: Path | None = None) -> dict[str, str]:
    """The child's environment: the working directory first on ``PYTHONPATH`` (Ray's workers
    inherit it), Flower's telemetry off unless set, and the handshake folder (:func:`main`)."""
    env = dict(os.environ)
    if handshake is not None:
        env[HANDSHAKE_ENV] = str(handshake)
    paths = [str((cwd or Path.cwd()).resolve())]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def main(argv: list[str] | None = None) -> int:
    from fedcore.config import from_run_config

    parser = argparse.ArgumentParser(prog="python -m fedcore.federation.simulation.engine")
    parser.add_argument("run_config", help="the run config as JSON (what child_argv writes)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if folder := os.environ.get(HANDSHAKE_ENV):
        _await_go(Path(folder))
    run_config = json.loads(args.run_config)
    settings = from_run_config(run_config)
    try:
        simulate(settings, out_dir=Path(run_config["out"]), verbose=args.verbose)
    except Exception:
        # Flower's ServerApp thread is no daemon: when the engine fails under it (its ClientApps
        # cannot start), it would keep this process alive, waiting for replies, until every round
        # timed out. `fedcore simulate` then closes the record as failed and stops Ray.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
