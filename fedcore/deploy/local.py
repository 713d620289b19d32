"""A whole deployment on one machine: one SuperLink and N SuperNodes on 127.0.0.1, TLS and node
authentication on, the fedcore app run with ``flwr run . CONNECTION --stream``.

This is the multi-host recipe of docs/deployment.md played on loopback, with every step done by
fedcore: fresh certificates and site keys (:mod:`fedcore.deploy.pki`) in a temporary folder, a
private ``FLWR_HOME`` with one connection, free ports chosen at run time (so several deployments,
tests included, can run side by side), the sites registered, each SuperNode given its node config
(``partition-id``/``num-partitions`` of the run's dataset), and every process started through a
:class:`~fedcore.deploy.processes.ProcessSupervisor`, which stops them all by process id whatever
happens (a failed step, a failed run, Ctrl-C, SIGTERM).

Use it as a context manager, in steps (what the integration test does), or through
:func:`deploy_local` (what ``fedcore deploy-local`` does)::

    with LocalDeployment(settings, out_dir=out, sites=3) as d:
        d.start_superlink()
        d.register_sites()
        d.start_supernodes()
        result = d.run()
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedcore.config import Settings
from fedcore.deploy import commands as cmd
from fedcore.deploy.flwr_home import (
    flower_env,
    free_port,
    port_open,
    write_connection,
    write_run_config,
)
from fedcore.deploy.pki import CertLayout, site_names, write_certs
from fedcore.deploy.processes import ManagedProcess, ProcessSupervisor, wait_until
from fedcore.errors import ConfigError

HOST = "127.0.0.1"
CONNECTION = "fedcore-local"
_NODE_UP = re.compile(r"SuperNode ID: (\d+)")
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")
_FLOWER_LOG = re.compile(
    r"^(\x1b\[[0-9;]*m)?(INFO|DEBUG|WARNING|ERROR|CRITICAL)\s*(\x1b\[[0-9;]*m)?\s*:\s*(.*)$"
)

Echo = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class FlwrRunOutcome:
    """How ``flwr run`` ended: its exit status, Flower's run id, and the seconds it took."""

    returncode: int
    run_id: str | None
    seconds: float


class LocalDeployment:
    """One SuperLink and ``sites`` SuperNodes on loopback; a context manager that stops them all.

    ``workdir`` (default: a new temporary folder, removed on a clean exit and kept, with the
    daemons' logs, when something failed) holds the certificates, ``FLWR_HOME`` and the logs.
    Every method raises :class:`ConfigError` when a step fails; the processes are stopped when
    the ``with`` block is left.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        out_dir: Path,
        sites: int | None = None,
        app_dir: Path | None = None,
        workdir: Path | None = None,
        echo: Echo = print,
        verbose: bool = False,
        startup_timeout: float = 120.0,
    ) -> None:
        from fedcore.federation.simulation.engine import find_app_dir

        self.bin_dir = cmd.flower_bin_dir()
        self.sites = settings.sites if sites is None else sites
        if self.sites != settings.sites:
            raise ConfigError(
                f"--sites {self.sites} disagrees with the setting sites={settings.sites}"
            )
        self.settings = settings
        self.out_dir = out_dir.expanduser().resolve()
        self.app_dir = (app_dir or find_app_dir()).resolve()
        self._own_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="fedcore-deploy-")) if workdir is None else workdir
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self.verbose = verbose
        self.startup_timeout = startup_timeout
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.env = flower_env(self.flwr_home, self.bin_dir)
        self.supervisor = ProcessSupervisor(mark=("FLWR_HOME", str(self.flwr_home)))
        self.certs: CertLayout | None = None
        self.superlink: ManagedProcess | None = None
        self.supernodes: list[ManagedProcess] = []
        self.port: int | None = None
        self.failed = False

    # -- context management ----------------------------------------------------------------

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.failed = self.failed or exc_type is not None
        self.close()

    def close(self) -> None:
        """Stop every process (by pid, with descendants); remove the workdir unless something
        failed."""
        self.supervisor.stop_all()
        if self._own_workdir and not self.failed:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif self.failed:
            self.echo(f"deploy: logs and keys kept in {self.workdir}")

    @property
    def address(self) -> str:
        if self.port is None:
            raise ConfigError("the SuperLink has not been started")
        return f"{HOST}:{self.port}"

    # -- steps -----------------------------------------------------------------------------

    def make_certs(self, extra_sites: int = 0) -> CertLayout:
        """CA, SuperLink certificate (loopback SANs) and keys for the sites (+ ``extra_sites``
        spare key pairs that are never registered, named ``stranger-K``)."""
        names = [*site_names(self.sites), *(f"stranger-{k}" for k in range(extra_sites))]
        self.certs = write_certs(self.workdir / "certs", sans=[HOST], names=names)
        return self.certs

    def start_superlink(self) -> ManagedProcess:
        """Start the SuperLink with TLS and node auth on a free port; wait until it accepts."""
        certs = self.certs or self.make_certs()
        for _attempt in range(3):  # a free port can be taken between choosing and binding it
            self.port = free_port(HOST)
            write_connection(
                self.flwr_home,
                name=CONNECTION,
                address=self.address,
                root_certificates=certs.ca_certificate,
            )
            process = self.supervisor.start(
                "superlink",
                cmd.superlink_argv(
                    self.bin_dir, host=HOST, port=self.port, tls=certs.tls, node_auth=True
                ),
                env=self.env,
                cwd=self.workdir,
                log_path=self.logs / "superlink.log",
                die_with_parent=True,  # a killed deploy-local leaves no deployment running
            )
            if self._wait_port(process):
                self.superlink = process
                self.echo(
                    f"deploy: SuperLink on {self.address} (TLS, node authentication), "
                    f"pid {process.pid}"
                )
                return process
            self.supervisor.stop(process)
        raise ConfigError(f"the SuperLink did not start; see {self.logs / 'superlink.log'}")

    def _wait_port(self, process: ManagedProcess) -> bool:
        """True once the SuperLink accepts connections; False if it exited (port taken?)."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if port_open(HOST, self.port or 0):
                return True
            if not process.running():
                return False
            time.sleep(0.2)
        raise ConfigError(
            f"the SuperLink did not accept connections within {self.startup_timeout:g} s; "
            f"see {self.logs / 'superlink.log'}"
        )

    def register_sites(self) -> list[str]:
        """``flwr supernode register`` every site's public key (in parallel); return node ids."""
        certs = self._need_certs()
        started = [
            self.supervisor.start(
                f"register {site.name}",
                cmd.register_argv(
                    self.bin_dir, public_key=site.public_key, connection=CONNECTION, name=site.name
                ),
                env=self.env,
                cwd=self.workdir,
                log_path=self.logs / f"register-{site.name}.log",
            )
            for site in certs.sites[: self.sites]
        ]
        ids = []
        for process in started:
            try:
                code = process.popen.wait(timeout=self.startup_timeout)
            except subprocess.TimeoutExpired:
                code = None
            if code != 0:
                raise ConfigError(f"{process.name} failed (exit {code}): {process.log_tail(5)}")
            found = re.search(r"SuperNode (\d+) registered", process.log_tail(50))
            ids.append(found.group(1) if found else "?")
        self.echo(f"deploy: registered {len(ids)} sites' public keys")
        return ids

    def start_supernode(
        self,
        index: int,
        *,
        key_name: str | None = None,
        node_config: Mapping[str, cmd.NodeValue] | None = None,
        max_retries: int | None = None,
    ) -> ManagedProcess:
        """Start a SuperNode with site ``index``'s key (or the key ``key_name``) and node config
        ``partition-id=index num-partitions=sites state-dir=OUT/sites`` (or ``node_config``)."""
        certs = self._need_certs()
        name = key_name or certs.sites[index].name
        key = next((s.private_key for s in certs.sites if s.name == name), None)
        if key is None:
            raise ConfigError(f"no key pair named {name!r} in {certs.directory}")
        config: dict[str, cmd.NodeValue] = dict(
            node_config
            or {
                "partition-id": index,
                "num-partitions": self.sites,
                # Where the site keeps its privacy ledger and secure-aggregation key (as
                # `fedcore simulate` does, under the run record).
                "state-dir": str(self.out_dir / "sites"),
                # ACTIVE mode: the trust root, and the site's certificate issued below.
                "secagg-ca": str(certs.ca_certificate),
            }
        )
        if (
            node_config is None
            and self.settings.secagg.enabled
            and self.settings.secagg.mode == "active"
        ):
            self._certify_secagg(index, name)
        process = self.supervisor.start(
            f"supernode {name}",
            cmd.supernode_argv(
                self.bin_dir,
                superlink=self.address,
                root_certificates=certs.ca_certificate,
                private_key=key,
                node_config=config,
                port=free_port(HOST),
                max_retries=max_retries,
            ),
            env=self.env,
            cwd=self.workdir,
            log_path=self.logs / f"supernode-{name}.log",
            die_with_parent=True,
        )
        return process

    def _certify_secagg(self, index: int, name: str) -> None:
        """Issue site ``index`` its secure-aggregation certificate from this deployment's CA (one
        operator holds the CA and every site's folder here; across hosts the CA holder runs
        ``fedcore certs DIR --issue``)."""
        from fedcore.crypto.certs import Pem
        from fedcore.federation.site.registry import certify_site
        from fedcore.federation.site.store import SiteStore

        certs = self._need_certs()
        store = SiteStore(self.out_dir / "sites", index)
        if not store.certificate_path.exists():
            ca = Pem(key=certs.ca_key.read_bytes(), certificate=certs.ca_certificate.read_bytes())
            certify_site(store, ca, site=name)

    def start_supernodes(self) -> list[ManagedProcess]:
        """Start one SuperNode per site and wait until each has been admitted by the SuperLink."""
        self.supernodes = [self.start_supernode(i) for i in range(self.sites)]
        self.wait_admitted(self.supernodes)
        self.echo(
            f"deploy: {self.sites} SuperNodes connected "
            f"(pids {', '.join(str(p.pid) for p in self.supernodes)})"
        )
        return self.supernodes

    def wait_admitted(self, nodes: list[ManagedProcess]) -> None:
        """Wait until every node logged its SuperNode id. Raises :class:`ConfigError` if one exits
        or the startup timeout passes."""

        def dead() -> str | None:
            for node in nodes:
                if not node.running():
                    return f"{node.name} exited with status {node.returncode()}: {node.log_tail(6)}"
            return None

        if not wait_until(
            lambda: all(_NODE_UP.search(n.log_tail(200)) for n in nodes),
            timeout=self.startup_timeout,
            interval=0.3,
            failed=dead,
        ):
            raise ConfigError(
                f"SuperNodes were not admitted within {self.startup_timeout:g} s; "
                f"logs in {self.logs}"
            )

    def run(self, *, run_timeout: float | None = None) -> FlwrRunOutcome:
        """``flwr run APP CONNECTION --run-config FILE --stream``; progress goes to ``echo``.

        Watches the daemons meanwhile: if the SuperLink dies the run is stopped and
        :class:`ConfigError` raised. A SuperNode that dies is reported; the server counts its
        site as failed after ``round_timeout``.
        """
        run_config = {**self.settings.to_run_config(), "out": str(self.out_dir)}
        config_file = write_run_config(self.workdir / "run-config.toml", run_config)
        argv = cmd.run_argv(
            self.bin_dir, app_dir=self.app_dir, connection=CONNECTION, run_config=config_file
        )
        start = time.monotonic()
        process = self.supervisor.start(
            "flwr run",
            argv,
            env=self.env,
            cwd=self.app_dir,
            stdout=subprocess.PIPE,
            die_with_parent=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(
            target=_pump, args=(process, lines, self.logs / "flwr-run.log"), daemon=True
        ).start()
        run_id: str | None = None
        reported_dead: set[int] = set()
        last_scan = 0.0
        while (line := _next_line(lines)) is not None:
            if line and run_id is None and (found := _RUN_STARTED.search(line)):
                run_id = found.group(1)
            if line and (shown := self._shown(line)) is not None:
                self.echo(shown)
            now = time.monotonic()
            if now - last_scan > 2.0:
                last_scan = now
                self._watch_daemons(reported_dead)
                if run_timeout is not None and now - start > run_timeout:
                    self.failed = True
                    raise ConfigError(f"the run took longer than {run_timeout:g} s")
        code = process.popen.wait()
        return FlwrRunOutcome(returncode=code, run_id=run_id, seconds=time.monotonic() - start)

    def _watch_daemons(self, reported_dead: set[int]) -> None:
        """During a run: raise :class:`ConfigError` if the SuperLink has exited (the deployment
        is then marked failed); report each SuperNode that exited, once (``reported_dead``: their
        pids, updated)."""
        self.supervisor.refresh_descendants()
        if self.superlink is not None and not self.superlink.running():
            self.failed = True
            raise ConfigError(
                f"the SuperLink exited with status {self.superlink.returncode()} during the run: "
                f"{self.superlink.log_tail(8)}"
            )
        for node in self.supernodes:
            if not node.running() and node.pid not in reported_dead:
                reported_dead.add(node.pid)
                self.echo(
                    f"deploy: {node.name} exited with status {node.returncode()} during the run"
                )

    def _shown(self, line: str) -> str | None:
        """What of a streamed line the user sees: Flower's INFO chatter only with ``verbose``."""
        text = line.rstrip("\n")
        match = _FLOWER_LOG.match(text)
        if match is None:
            return text if text.strip() else None
        level, message = match.group(2), match.group(4).strip()
        if not message:
            return None
        if level in ("WARNING", "ERROR", "CRITICAL") or self.verbose:
            return f"{level.lower()}: {message}"
        return None

    def _need_certs(self) -> CertLayout:
        if self.certs is None:
            raise ConfigError(
                "certificates have not been made; call make_certs() or start_superlink() first"
            )
        return self.certs


def _next_line(lines: queue.Queue[str | None], timeout: float = 0.5) -> str | None:
    """The next streamed line; ``""`` when none came within ``timeout``; None at the end."""
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return ""


def _pump(process: ManagedProcess, lines: queue.Queue[str | None], log_path: Path) -> None:
    """Copy a process's stdout into ``lines`` and a log file, then put None."""
    stream = process.popen.stdout
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with log_path.open("a", encoding="utf-8", errors="replace") as log:
            if stream is not None:
                for raw in iter(stream.readline, b""):
                    text = raw.decode(errors="replace")
                    log.write(text)
                    log.flush()
                    lines.put(text)
    finally:
        lines.put(None)


def deploy_local(
    settings: Settings,
    *,
    out_dir: Path,
    echo: Echo = print,
    verbose: bool = False,
    app_dir: Path | None = None,
) -> FlwrRunOutcome:
    """Start a loopback deployment, run the app once, stop everything; return how the run ended.

    The run record goes to ``out_dir``. Raises :class:`ConfigError` when a step fails (nothing is
    left running then), and lets ``KeyboardInterrupt`` and
    :class:`~fedcore.deploy.processes.Stopped` through after stopping everything.
    """
    with LocalDeployment(
        settings, out_dir=out_dir, echo=echo, verbose=verbose, app_dir=app_dir
    ) as deployment:
        echo(f"deploy: working folder {deployment.workdir}")
        deployment.make_certs()
        deployment.start_superlink()
        deployment.register_sites()
        deployment.start_supernodes()
        outcome = deployment.run()
        deployment.failed = outcome.returncode != 0 or not completed(out_dir, settings.rounds)
        return outcome


def completed(out_dir: Path, rounds: int) -> bool:
    """Whether the run record in ``out_dir`` holds ``rounds`` rounds and the final model."""
    history = out_dir / "history.jsonl"
    if not history.exists() or not (out_dir / "model.pt").exists():
        return False
    return sum(1 for line in history.read_text().splitlines() if line.strip()) >= rounds
