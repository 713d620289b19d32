"""Hosts for the deployment tests: Linux network namespaces on one virtual switch.

Each host is a network namespace with its own address, its own loopback and its own folder (its
"disk": state dir, ``FLWR_HOME``, logs); each is cabled by a veth pair to a bridge that lives in a
namespace of its own (the switch), so nothing is added to the machine's own network and two test
runs never see each other's addresses. Every name starts with a prefix unique to the test run
(namespaces ``PREFIX-sw``, ``PREFIX-superlink``, ``PREFIX-site-0``..; switch ports ``PREFIXp0``..).

- :meth:`Network.cut` / :meth:`Network.restore` pull and plug a host's cable at the switch
  (``ip link set PORT down``/``up``); the host keeps its address and its processes.
- :meth:`Network.shape` caps a host's link in both directions with ``tc ... tbf``;
  :meth:`Network.delay` adds latency with ``netem`` and raises :class:`NetemUnavailable` on a
  kernel without it.
- :meth:`Network.remove` deletes every namespace the network created (which deletes the veths
  and the bridge in them); run it after the processes inside have been stopped.

Processes are started by the caller (through a
:class:`~fedcore.deploy.processes.ProcessSupervisor`) with :meth:`Host.argv`, i.e.
``ip netns exec NS ...``, which execs the program itself: its pid is the program's.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedcore.deploy.processes import ManagedProcess, ProcessSupervisor

SUBNET = "10.77.0"  # /24 on the switch; the SuperLink is .1, site K is .(10 + K)
LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp
NODE_UP = re.compile(r"SuperNode ID: (\d+)")
REGISTERED = re.compile(r"SuperNode (\d+) registered")
_BLOCK = re.compile(r"<!-- hosts-test: ([\w-]+) -->\s*```bash\n(.*?)```", re.S)


class NetemUnavailable(RuntimeError):
    """The kernel has no ``netem`` queueing discipline (``sch_netem``)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def netns_unusable() -> str | None:
    """Why network namespaces cannot be used here (one line), or None when they can."""
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    if os.geteuid() != 0:
        return "needs root for `ip netns` (not root here)"
    probe = f"fcprobe{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def run_prefix() -> str:
    """A name prefix unique to this test run (short: interface names hold 15 characters)."""
    return f"fc{os.getpid() % 1000:03d}{secrets.token_hex(2)}"


@dataclass(frozen=True, slots=True)
class Host:
    """One host: its namespace, address, switch port and folder."""

    name: str
    netns: str
    address: str
    port: str  # the switch side of its cable
    root: Path

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: list[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a short command inside the namespace; raise RuntimeError if it fails."""
        result = subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{self.name}: {' '.join(argv)}: {result.stderr.strip()}")
        return result


@dataclass(slots=True)
class Network:
    """A switch and the hosts cabled to it; :meth:`remove` undoes all of it."""

    prefix: str
    root: Path
    hosts: dict[str, Host] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def create_switch(self) -> None:
        self._add_netns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add_host(self, name: str, number: int) -> Host:
        """A namespace ``PREFIX-name`` with address ``SUBNET.number/24`` on ``eth0`` and ``lo`` up."""
        host = Host(
            name=name,
            netns=f"{self.prefix}-{name}",
            address=f"{SUBNET}.{number}",
            port=f"{self.prefix}p{number}",
            root=self.root / name,
        )
        self._add_netns(host.netns)
        inner = f"{self.prefix}i{number}"
        _ip("link", "add", inner, "netns", host.netns, "type", "veth", "peer", "name", host.port,
            "netns", self.switch)  # fmt: skip
        _ip("-n", host.netns, "link", "set", inner, "name", "eth0")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
        host.root.mkdir(parents=True, exist_ok=True)
        self.hosts[name] = host
        return host

    def add_address(self, host: Host, address: str) -> None:
        """A second address on the host's ``eth0``."""
        _ip("-n", host.netns, "addr", "add", f"{address}/24", "dev", "eth0")

    def cut(self, host: Host) -> None:
        """Pull the host's cable at the switch."""
        _ip("-n", self.switch, "link", "set", host.port, "down")

    def restore(self, host: Host) -> None:
        _ip("-n", self.switch, "link", "set", host.port, "up")

    def shape(self, host: Host, *, mbit: int) -> None:
        """Cap the host's link at ``mbit`` Mbit/s each way (token bucket: ``tc ... tbf``)."""
        rate = [f"{mbit}mbit", "burst", "32kbit", "latency", "400ms"]
        self._tc(host.netns, "eth0", "tbf", "rate", *rate)  # what the host sends
        self._tc(self.switch, host.port, "tbf", "rate", *rate)  # what it receives

    def delay(self, host: Host, *, ms: int, mbit: int) -> None:
        """``ms`` of latency each way at ``mbit`` Mbit/s (``netem``); NetemUnavailable where the
        kernel lacks it."""
        netem = ["netem", "delay", f"{ms}ms", "rate", f"{mbit}mbit"]
        try:
            self._tc(host.netns, "eth0", *netem)
            self._tc(self.switch, host.port, *netem)
        except RuntimeError as exc:
            raise NetemUnavailable(str(exc)) from None

    def queue_bytes(self, host: Host) -> tuple[int, int]:
        """Bytes through the host's root queue (sent by it, sent to it): ``tc -s qdisc``."""
        return (
            _sent(self._tc_stats(host.netns, "eth0")),
            _sent(self._tc_stats(self.switch, host.port)),
        )

    def listening(self, pid: int, port: int) -> bool:
        """Whether a TCP socket listens on ``port`` in the namespace of process ``pid``."""
        try:
            lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
        except OSError:
            return False
        want = f":{port:04X}"
        return any(f[1].endswith(want) and f[3] == LISTEN for f in (line.split() for line in lines))

    def remove(self) -> None:
        """Delete every namespace this network created, newest first (idempotent)."""
        while self.namespaces:
            _ip("netns", "del", self.namespaces.pop(), check=False)

    def leftovers(self) -> list[str]:
        """Namespaces with this run's prefix that still exist."""
        listed = _ip("netns", "list", check=False).stdout.split()
        return [n for n in listed if n.startswith(f"{self.prefix}-")]

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.namespaces.append(name)

    @staticmethod
    def _tc(netns: str, dev: str, *qdisc: str) -> None:
        result = subprocess.run(
            ["ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", dev, "root", *qdisc],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(f"tc qdisc add dev {dev} root {' '.join(qdisc)}: {result.stderr}")

    @staticmethod
    def _tc_stats(netns: str, dev: str) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", netns, "tc", "-s", "qdisc", "show", "dev", dev],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout


def _sent(stats: str) -> int:
    """The first ``Sent N bytes`` of ``tc -s qdisc show`` output (0 if none)."""
    for line in stats.splitlines():
        words = line.split()
        if words[:1] == ["Sent"] and len(words) > 2 and words[2] == "bytes":
            return int(words[1])
    return 0


# -- the guide, and what a federation across the hosts recorded ---------------------------


def command_options(argv: list[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
    """A command line as (program and positional words, sorted options): the same command
    whatever order its options come in."""
    words, options, i = [], [], 0
    while i < len(argv):
        if argv[i].startswith("--"):
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
            options.append((argv[i], value))
            i += 1 if value is None else 2
        else:
            words.append(argv[i])
            i += 1
    return words, sorted(options, key=lambda o: (o[0], o[1] or ""))


def guide_blocks(guide: Path) -> dict[str, str]:
    """The guide's bash blocks marked ``<!-- hosts-test: NAME -->``, by name."""
    return {name: body for name, body in _BLOCK.findall(guide.read_text())}


# -- what the federation recorded --------------------------------------------------------------


@dataclass(slots=True)
class Played:
    """What happened, for the tests to check."""

    net: Network
    supervisor: ProcessSupervisor
    out: Path = Path()
    node_of: dict[int, int] = field(default_factory=dict)  # site -> Flower node id
    run: ManagedProcess | None = None  # flwr run
    run_code: int | None = None
    run_log: str = ""
    stranger_code: int | None = None
    stranger_log: str = ""
    intruder_code: int | None = None
    intruder_log: str = ""
    cut_at_rows: int | None = None  # history rows when the cable was pulled
    restored_at_rows: int | None = None
    killed: list[int] = field(default_factory=list)  # pids that got SIGKILL
    restarted_node: int | None = None  # the node id the restarted SuperNode logged
    restart_attempts: int = 0
    queue_bytes: tuple[int, int] = (0, 0)  # site SLOW: bytes through its tbf queues (up, down)
    netem: str | None = None  # why there is no latency case, or None when site DELAYED has it
    seconds: float = 0.0
    timeline: list[str] = field(default_factory=list)

    def history(self) -> list[dict]:
        path = self.out / "history.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def operator(self) -> list[dict]:
        """The rows of the run's ``operator.jsonl`` (the serialized bytes by stage and by node)."""
        path = self.out / "operator.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def note(self, what: str) -> None:
        self.timeline.append(f"{time.monotonic():.1f} {what}")

    def site(self, k: int) -> Host:
        return self.net.hosts[f"site-{k}"]

    def journal(self, k: int) -> list[dict]:
        """Site k's journal lines after the header."""
        path = self.site(k).root / f"site-{k}" / f"site-{k}.secagg.journal"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()[1:] if line.strip()]

    def events(self, k: int, event: str) -> int:
        """How many ``event: true`` lines site k's journal holds."""
        return sum(1 for line in self.journal(k) if line.get(event) is True)

    def lines(self, k: int, key: str) -> int:
        """How many lines of site k's journal have ``key``."""
        return sum(1 for line in self.journal(k) if key in line)


ORDER = ("nonce", "session", "trained", "masked", "signed", "unmasked")


def survivors(played: Played, round_number: int) -> set[int]:
    return set(played.history()[round_number - 1]["secagg"]["survivors"])


def all_but(played: Played, *sites: int) -> set[int]:
    return {node for k, node in played.node_of.items() if k not in sites}


def rounds_of(journal: list[dict]) -> list[list[str]]:
    """Each round's events, in journal order."""
    rounds: dict[str, list[str]] = {}
    for line in journal:
        kind = next(key for key in ORDER if key in line)
        rounds.setdefault(line["round"], []).append(kind)
    return list(rounds.values())


def distribute(operator: Host, site: Host, k: int) -> None:
    """Copy ca.crt and site k's key to its host, under the same $DEPLOY/pki paths."""
    (site.root / "pki" / "sites").mkdir(parents=True, exist_ok=True)
    shutil.copy2(operator.root / "pki" / "ca.crt", site.root / "pki" / "ca.crt")
    shutil.copy2(
        operator.root / "pki" / "sites" / f"site-{k}.key",
        site.root / "pki" / "sites" / f"site-{k}.key",
    )


def admitted(process: ManagedProcess) -> int | None:
    found = NODE_UP.search(process.log_tail(400))
    return int(found.group(1)) if found else None


def kill_tree(supervisor: ProcessSupervisor, victim: ManagedProcess) -> list[int]:
    """SIGKILL to ``victim`` and every descendant (frozen first, so none escapes); their pids."""
    victim.stop_signal = signal.SIGKILL
    supervisor.refresh_descendants()
    killed = [victim.pid, *(d.pid for d in victim.descendants)]
    supervisor.stop(victim)
    return killed
