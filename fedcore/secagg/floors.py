"""The weakest round a site agrees to join: its floors, and the protocol's safe rules behind them.

Theory of operation. The server chooses a round's participants, threshold, neighbour graph and mode,
and every one of them decides what a colluding server learns:

- the complete graph (Bonawitz et al., CCS 2017, Theorem 6.2 and section 6): a server colluding
  with fewer than t sites learns only the sum when t > n/2 (semi-honest); against an active server
  that splits the survivors into two groups, t > 2n/3 (:func:`~fedcore.secagg.default_threshold`);
  with t = 2 an active server unmasks every input;
- the SecAgg+ Harary graph (Bell et al., CCS 2020, section 4.2): the degree k and threshold t must
  pass the FCP finder (:mod:`fedcore.secagg.params`) for n clients, with 5% corrupt and 5% dropped
  clients assumed (FCP's published operating point), against a semi-honest server in SEMI_HONEST
  mode and a semi-malicious one in ACTIVE mode.

A site applies these rules to every offer (:meth:`Floors.check`), and on top of them the floors its
operator set in the node config (never the run config, which the server writes): the mode it
requires, and the least threshold, degree and number of participants. A weaker offer is refused
with its reason, before the site sends anything. ``safe_rules=False`` drops the protocol's rules
(keeping the operator's floors); only a simulation whose user opted into unsafe settings
(``secagg.allow_unsafe``) runs so, since there the server and the sites are the same person.

The floors hold against the sites that actually take part, not only the invitees (a server could
invite 100 sites and let only the target and a few colluders take part). Every
:class:`~fedcore.secagg.SecAggClient` enforces them itself, before each thing it releases: the offer
at the advertise stage (:meth:`Floors.check`); the advertisers U1 before its ring reveal and its
shares, re-checking the round as if only U1 had been invited, since the graph is drawn over U1
(:meth:`Floors.check_joined`); with the complete graph, the senders whose shares opened before its
masked input (all of U2 it can see; with a sparse graph it sees only its neighbours, and the next
check covers it); and the survivors U3 before it signs them (ACTIVE mode) and before it reveals
any unmask share (:meth:`Floors.check_participants`).

Under distributed DP (Kairouz, Liu and Steinke, ICML 2021; :mod:`fedcore.mechanisms.distributed`)
each site adds a share of the noise sized for ``min_survivors`` sites, so a sum of fewer survivors
holds less noise than the target. The session binds that floor, and every client refuses to sign
or reveal any unmask share for a survivor set below it (:func:`check_noise_floor`): a server that
drops sites to thin the noise gets no sum. This floor is the session's own, not the operator's.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

from fedcore.errors import ConfigError, RemoteProtocolError
from fedcore.secagg.config import Mode, SessionConfig, default_threshold
from fedcore.secagg.params import AdversaryClass, threshold_floor

CORRUPT_FRACTION = 0.05
DROPOUT_FRACTION = 0.05


def safe_threshold(clients: int, *, neighbors: int, mode: Mode) -> int:
    """The least threshold the protocol's safe rules allow for this round shape.

    ``neighbors``: 0 (or >= clients - 1) for the complete graph, else the even SecAgg+ degree.
    Raises ConfigError when no threshold is safe: a SecAgg+ degree too small for ``clients``.
    """
    if neighbors == 0 or neighbors >= clients - 1:
        return default_threshold(clients, mode=mode)
    adversary = AdversaryClass.SEMI_MALICIOUS if mode is Mode.ACTIVE else AdversaryClass.SEMI_HONEST
    t = threshold_floor(
        clients,
        neighbors,
        corrupt_fraction=CORRUPT_FRACTION,
        dropout_fraction=DROPOUT_FRACTION,
        adversary=adversary,
    )
    if t is None:
        raise ConfigError(
            f"a SecAgg+ graph of degree {neighbors} over {clients} clients is not safe in "
            f"{mode.name} mode (Bell et al. 2020, section 4.2, with {CORRUPT_FRACTION:.0%} corrupt "
            f"and {DROPOUT_FRACTION:.0%} dropped clients); use more neighbours or the complete graph"
        )
    return t


@dataclass(frozen=True, slots=True)
class Floors:
    """The weakest offer a site accepts. ``mode``: the mode it requires (ACTIVE refuses a
    SEMI_HONEST round; SEMI_HONEST accepts both). ``min_threshold``, ``min_neighbors`` (0: any
    graph), ``min_clients``: the operator's own floors, on top of the safe rules unless
    ``safe_rules`` is False."""

    mode: Mode = Mode.SEMI_HONEST
    min_threshold: int = 2
    min_neighbors: int = 0
    min_clients: int = 2
    safe_rules: bool = True

    def check(self, config: SessionConfig) -> None:
        """Raise RemoteProtocolError, naming the floor, if ``config`` offers less than it."""
        n = len(config.clients)
        if self.mode is Mode.ACTIVE and config.mode is not Mode.ACTIVE:
            raise RemoteProtocolError(
                f"refused: the server offers a {config.mode.name} round; this site requires "
                f"{self.mode.name} mode (node config 'secagg-mode')"
            )
        if n < self.min_clients:
            raise RemoteProtocolError(
                f"refused: the round has {n} participants; this site requires at least "
                f"{self.min_clients} (node config 'secagg-min-participants')"
            )
        sparse = not config.complete and config.neighbors < n - 1
        if sparse and config.neighbors < self.min_neighbors:
            raise RemoteProtocolError(
                f"refused: the round's graph gives each site {config.neighbors} neighbours; this "
                f"site requires at least {self.min_neighbors} (node config 'secagg-min-neighbors')"
            )
        if config.threshold < self.min_threshold:
            raise RemoteProtocolError(
                f"refused: the round's threshold is {config.threshold}; this site requires at "
                f"least {self.min_threshold} (node config 'secagg-min-threshold')"
            )
        if not self.safe_rules:
            return
        try:
            floor = safe_threshold(n, neighbors=config.neighbors if sparse else 0, mode=config.mode)
        except ConfigError as exc:
            raise RemoteProtocolError(f"refused: {exc}") from None
        if config.threshold < floor:
            raise RemoteProtocolError(
                f"refused: the round's threshold {config.threshold} is below the safe "
                f"{floor} for {n} participants"
                + (f" with {config.neighbors} neighbours" if sparse else " (complete graph)")
                + f" in {config.mode.name} mode"
            )

    def check_participants(self, count: int, *, what: str) -> None:
        """Raise RemoteProtocolError if fewer than ``min_clients`` sites take part: ``count``
        ``what`` (for example "sites survived to the masked input")."""
        if count < self.min_clients:
            raise RemoteProtocolError(
                f"refused: {count} {what}; this site requires at least {self.min_clients} "
                "participants (node config 'secagg-min-participants')"
            )

    def check_joined(self, config: SessionConfig, joined: Collection[int]) -> None:
        """Raise RemoteProtocolError unless the round over the sites that advertised keys (U1,
        over which the graph is drawn) passes every floor, as if only they had been invited."""
        self.check_participants(len(joined), what="sites advertised keys")
        try:
            actual = replace(config, clients=tuple(sorted(joined)))
        except ConfigError as exc:
            raise RemoteProtocolError(
                f"refused: the advertised set breaks the round: {exc}"
            ) from None
        try:
            self.check(actual)
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(
                f"{exc} (counting the {len(joined)} sites that advertised keys, "
                f"of {len(config.clients)} invited)"
            ) from None


def check_noise_floor(config: SessionConfig, survivors: int) -> None:
    """Raise RemoteProtocolError when a distributed-DP session (``config.min_survivors`` set) has
    fewer than ``min_survivors`` ``survivors``: their noise would not meet the target."""
    floor = config.min_survivors
    if floor is not None and survivors < floor:
        raise RemoteProtocolError(
            f"refused: {survivors} sites survived to the masked input, below the session's "
            f"distributed-DP floor of {floor} (the noise target needs that many noisers); nothing "
            "is revealed"
        )
