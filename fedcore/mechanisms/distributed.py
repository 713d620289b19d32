"""Distributed DP under secure aggregation: every site adds a share of discrete noise before masking.

Theory of operation (Kairouz, Liu and Steinke, ICML 2021, distributed discrete Gaussian; Agarwal,
Kairouz and Liu, NeurIPS 2021, Skellam). Each site clips its update, rotates, scales, rounds and
adds its noise share (:func:`fedcore.mechanisms.distributed_encoding.encode_site`) *before* the
masked input leaves it, so the only thing secure aggregation reveals, the sum, is already private,
against the server too. The accounting is in :mod:`fedcore.privacy.distributed`.

Who enforces what. The server plans the round (:meth:`DistributedDP.plan`: the scale ``gamma`` that
keeps the noised sum in the ring, and the per-site noise for ``h = min_survivors - colluders``
honest noisers) and binds it into the session (:class:`~fedcore.secagg.config.DistributedSession`,
hashed by the session id, so a replayed request cannot change it). The guarantee does not rest on
the server's plan:

- every site refuses to reveal an unmask share when fewer than the session's ``min_survivors``
  survived (:func:`fedcore.secagg.floors.check_noise_floor`): a server that drops sites to thin
  the noise gets no sum;
- each site recomputes the round's event from what the session binds and its own view of the
  round (:func:`site_event`): ``n`` the session's clients, ``h`` the session's floor less the
  larger of the session's colluders and the site's own assumption, the sensitivities from
  ``gamma``, the clip norm, the padded dimension and ``beta``. It charges that event to its own
  ledger (:class:`SiteHalf`; scope ``site_against_server``) before the masked input leaves, and
  declines, before training, a round its budget cannot afford. A server that lowers the noise or the
  floor only makes the site charge more, or decline sooner.

Relations: zero-out one whole site (the site takes part, sends ``0``, and still adds its noise
share), against the server (which knows the sample: no amplification by sampling is claimed) and
so against everyone downstream of it. ``dp.distributed.colluders`` (default -1: the protocol's own
corruption bound, ``t - 1`` for the safe threshold ``t`` of the round's ``n``, graph and mode,
:func:`fedcore.secagg.floors.safe_threshold`) survivors are assumed to add no noise.

Assumptions: at most ``colluders`` sampled sites collude with the server or skip their noise; the
rotation seed is public and bound to the session (:func:`rotation_seed`: SHA-256 of a label and the
session id, which hashes every site's advertised keys, so the server cannot choose it alone).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from fedcore.errors import ConfigError, FedcoreError, LocalProtocolError, RemoteProtocolError
from fedcore.mechanisms.base import SiteLevelDP
from fedcore.privacy.relations import SiteRelation
from fedcore.secagg.config import DistributedSession, Mode, SessionConfig

if TYPE_CHECKING:
    import numpy as np

    from fedcore.federation.site.store import SiteStore
    from fedcore.mechanisms.distributed_encoding import DistributedEncoding
    from fedcore.privacy import PrivacyLedger, Scope
    from fedcore.privacy.distributed import DistributedEvent
    from fedcore.privacy.distributed_plan import DistributedPlan

ROTATION_LABEL = b"fedcore/distributed-dp/rotation-seed|"
DEFAULT_BETA = math.exp(-0.5)  # KLS21's choice (fedcore.privacy.distributed_plan.DEFAULT_BETA)


def rotation_seed(session_id: bytes) -> bytes:
    """The round's public rotation seed: SHA-256 of a label and the session id."""
    if not session_id:
        raise LocalProtocolError(
            "the rotation seed needs the session id (after the advertise stage)"
        )
    return hashlib.sha256(ROTATION_LABEL + session_id).digest()


def protocol_colluders(sites: int, *, neighbors: int, mode: Mode) -> int:
    """``t - 1`` for the safe threshold ``t`` of a round of ``sites`` (the protocol's corruption
    bound). ConfigError when no threshold is safe for the graph."""
    from fedcore.secagg.floors import safe_threshold

    return safe_threshold(sites, neighbors=neighbors, mode=mode) - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class DistributedDP(SiteLevelDP):
    """Distributed discrete noise under secure aggregation (``dp.distributed.*``): the site half
    (:class:`SiteHalf`) noises and charges at each site, the server half
    (:class:`~fedcore.federation.server.secagg_sums.DistributedSum`) decodes the sum and charges
    the federation ledger. Its epsilon binds against the server (``budget_against`` is
    sample-known: the server knows who took part)."""

    name: ClassVar[str] = "distributed"
    on_secagg: ClassVar[bool] = True
    relation: ClassVar[str] = SiteRelation.ZERO_OUT.value
    sample_known_relation: ClassVar[str] = SiteRelation.ZERO_OUT.value

    noise: str  # "dgauss" | "skellam" (fedcore.privacy.distributed.DistributedNoise values)
    bits: int
    dropout_tolerance: float
    colluders: int  # -1: the protocol's corruption bound for each round
    neighbors: int  # secure aggregation's graph setting (0: complete)
    mode: Mode
    beta: float = DEFAULT_BETA

    @property
    def title(self) -> str:
        kind = "discrete Gaussian" if self.noise == "dgauss" else "Skellam"
        return f"distributed DP, {kind} noise added by each site before masking"

    @property
    def noise_description(self) -> str:
        if self.noise == "dgauss":
            return (
                "distributed discrete Gaussian: each site adds a share of N_Z(0, sigma^2) before "
                "masking (Kairouz, Liu and Steinke 2021)"
            )
        return (
            "Skellam: each site adds a share, the difference of two Poisson draws, before masking "
            "(Agarwal, Kairouz and Liu 2021)"
        )

    @property
    def calibrated(self) -> bool:
        return True  # each site's share is calibrated over ``rounds``

    def colluders_for(self, sites: int) -> int:
        """The colluders assumed in a round of ``sites`` sites."""
        if self.colluders >= 0:
            return self.colluders
        k = 0 if self.neighbors >= sites - 1 else self.neighbors
        return protocol_colluders(sites, neighbors=k, mode=self.mode)

    def plan(self, *, sites: int, dim: int) -> DistributedPlan:
        """The round's parameters for ``sites`` sites and a ``dim``-parameter model (cached: the
        search takes tenths of a second). ConfigError naming the setting that cannot work."""
        return _plan(self, sites, dim)

    def round_event(self) -> DistributedEvent:  # type: ignore[override]
        raise ConfigError("a distributed-DP round's event needs the model: use plan(...)")

    def server_config(self):  # type: ignore[no-untyped-def]
        raise ConfigError("distributed DP has no server-side Gaussian (DP-FedAvg) configuration")

    def check_before_run(self, *, dim: int, record_dir: Path | None = None) -> None:
        """Plan a round of every site (ConfigError for a ring too small, a tolerance or colluder
        count that leaves no honest noiser) and refuse a federation ledger that cannot afford one
        more round. Reads the ledger without writing it."""
        from fedcore.privacy import PrivacyLedger
        from fedcore.privacy.ledger import FEDERATION_LEDGER_FILE

        plan = self.plan(sites=self.sites, dim=dim)
        folder = Path(self.state_dir) if self.state_dir else record_dir
        path = None if folder is None else folder / FEDERATION_LEDGER_FILE
        entries = PrivacyLedger.load(path).entries if path is not None and path.exists() else ()
        ledger = PrivacyLedger(
            scope=self.scope(), budget=self.budget(), accountant=self.accountant, entries=entries
        )
        after = ledger.epsilon_if_charged(plan.round_event())
        if not after <= self.epsilon:
            raise ConfigError(
                f"dp.distributed.epsilon={self.epsilon:g} cannot afford one more round: the "
                f"federation ledger would reach {after:.4g} (spent {ledger.epsilon():.4g})"
            )

    def session(self, plan: DistributedPlan, *, sites: int) -> DistributedSession:
        """What the session binds of ``plan`` for a round of ``sites`` sites."""
        from fedcore.privacy.distributed import min_survivors

        floor = min_survivors(sites=sites, dropout_tolerance=self.dropout_tolerance)
        return DistributedSession(
            noise=self.noise,
            gamma=plan.gamma,
            site_noise=plan.site_noise,
            beta=plan.beta,
            min_survivors=floor,
            colluders=floor - plan.noisers,
        )

    def parameters(self, plan: DistributedPlan) -> dict[str, float]:
        """The round's parameters, for the run record's round row."""
        return {
            "distributed_gamma": plan.gamma,
            "distributed_site_noise": plan.site_noise,
            "distributed_noisers": float(plan.noisers),
            "distributed_bits": float(plan.bits),
            "distributed_clip_probability": plan.clip_probability,
        }

    def site_scope(self, site_id: int) -> Scope:
        from fedcore.privacy import Scope, ScopeKind

        return Scope(ScopeKind.SITE_AGAINST_SERVER, f"site-{site_id}")

    def summary_lines(self, spent: str) -> list[str]:
        """What ``summary.md`` says of this mechanism; ``spent`` the federation's epsilon."""
        return [
            f"- **Site-level DP ({self.title})**: epsilon {self.epsilon:g} at delta "
            f"{self.delta:g} for each site and for the federation, against the server itself "
            f"(relation *{self.relation}*); no amplification by sampling is claimed.",
            f"  - `server_epsilon` {spent}: the federation ledger's charge for the released sums, "
            "at the survivors' honest noisers; it holds against the server and everyone after it.",
            "  - Each site charges its own ledger (`site-<id>.distributed-ledger.json`) for the "
            "noise floor it enforces (the session's fewest survivors less the colluders), and "
            "declines a round its budget cannot afford.",
        ]

    def describe(self) -> str:
        colluders = "protocol bound t-1" if self.colluders < 0 else str(self.colluders)
        return (
            f"site-level DP ({self.title}, epsilon {self.epsilon:g} against the server, delta "
            f"{self.delta:g}, {self.bits}-bit ring, clip norm {self.clip_norm:g}, dropout "
            f"tolerance {self.dropout_tolerance:g}, colluders {colluders})"
        )


@functools.lru_cache(maxsize=32)
def _plan(mechanism: DistributedDP, sites: int, dim: int) -> DistributedPlan:
    from fedcore.privacy.distributed import DistributedNoise
    from fedcore.privacy.distributed_plan import plan_distributed

    return plan_distributed(
        noise=DistributedNoise(mechanism.noise),
        epsilon=mechanism.epsilon,
        delta=mechanism.delta,
        rounds=mechanism.rounds,
        sites=sites,
        colluders=mechanism.colluders_for(sites),
        dropout_tolerance=mechanism.dropout_tolerance,
        bits=mechanism.bits,
        dim=dim,
        clip_norm=mechanism.clip_norm,
        beta=mechanism.beta,
    )


def clear_plan_cache() -> None:
    """Forget every cached plan (a benchmark's fresh server process; plans are pure functions of
    the settings, so a cached one is never stale)."""
    from fedcore.privacy.distributed_plan import clear_plan_cache as clear_plans

    _plan.cache_clear()
    clear_plans()


def session_encoding(config: SessionConfig, *, dim: int) -> DistributedEncoding:
    """The site's encoding of a ``dim``-parameter update under ``config``'s distributed section.
    RemoteProtocolError when the session does not fit (its length, its values)."""
    from fedcore.mechanisms.distributed_encoding import DistributedEncoding
    from fedcore.privacy.distributed import DistributedNoise

    d, bound = config.distributed, config.encoding
    if d is None or bound is None:
        raise RemoteProtocolError("refused: the session binds no distributed-DP section")
    try:
        encoding = DistributedEncoding(
            noise=DistributedNoise(d.noise),
            dim=dim,
            clip_norm=bound.dp_clip_norm,
            gamma=d.gamma,
            site_noise=d.site_noise,
            bits=config.bits,
            beta=d.beta,
        )
    except ConfigError as exc:
        raise RemoteProtocolError(f"refused before training: {exc}") from None
    if encoding.padded_dim != config.length:
        raise RemoteProtocolError(
            f"refused before training: the session's vector length {config.length} is not the "
            f"padded length {encoding.padded_dim} of this model's {dim} parameters"
        )
    return encoding


def site_event(
    config: SessionConfig, encoding: DistributedEncoding, *, colluders: int
) -> DistributedEvent:
    """The event this site charges for ``config``: the session's floor ``min_survivors`` less the
    larger of the session's colluders and the site's own ``colluders`` (-1: ``t - 1`` of the
    protocol's safe threshold for the session's ``n``, graph and mode) honest noisers, the
    sensitivities of the site's own rounding bound. RemoteProtocolError when no honest noiser is
    left or the share is too small for the bound (KLS21 Thm 1: sigma >= 1/2)."""
    from fedcore.privacy.distributed import (
        DistributedDiscreteGaussianEvent,
        SkellamEvent,
        rounded_l1_bound,
    )

    d = config.distributed
    if d is None:
        raise RemoteProtocolError("refused: the session binds no distributed-DP section")
    n = len(config.clients)
    own = colluders
    if own < 0:
        sparse = not config.complete and config.neighbors < n - 1
        try:
            own = protocol_colluders(
                n, neighbors=config.neighbors if sparse else 0, mode=config.mode
            )
        except ConfigError as exc:
            raise RemoteProtocolError(f"refused before training: {exc}") from None
    h = d.min_survivors - max(own, d.colluders)
    if h < 1:
        raise RemoteProtocolError(
            f"refused before training: a floor of {d.min_survivors} survivors with "
            f"{max(own, d.colluders)} colluders leaves no honest site to add the noise"
        )
    l2 = encoding.rounding_bound
    l1 = rounded_l1_bound(l2_bound=l2, dim=encoding.padded_dim)
    common = dict(l2_sensitivity=l2, l1_sensitivity=l1, noisers=h, dim=encoding.padded_dim)
    try:
        if d.noise == "dgauss":
            return DistributedDiscreteGaussianEvent(sigma=d.site_noise, **common)
        return SkellamEvent(mu=d.site_noise, **common)
    except ConfigError as exc:
        raise RemoteProtocolError(f"refused before training: {exc}") from None


@dataclass(frozen=True, slots=True)
class SiteHalf:
    """One distributed-DP round at a site, checked before it trains: its encoding, the event it
    charges and its own ledger (``SiteStore.distributed_ledger_path``)."""

    encoding: DistributedEncoding
    event: DistributedEvent
    ledger: PrivacyLedger
    seed: bytes
    label: str

    @classmethod
    def prepare(
        cls,
        mechanism: DistributedDP | None,
        config: SessionConfig,
        *,
        dim: int,
        store: SiteStore,
        session_id: bytes,
    ) -> SiteHalf:
        """Everything that could refuse the round, before training: RemoteProtocolError for a
        session this site cannot serve (or a site without a distributed-DP budget),
        BudgetExceededError (ledger unchanged) when its budget cannot afford the round."""
        from fedcore.privacy import PrivacyLedger

        if mechanism is None:
            raise RemoteProtocolError(
                "refused before training: a distributed-DP session, but this site has no "
                "distributed-DP budget (dp.distributed.epsilon is unset)"
            )
        encoding = session_encoding(config, dim=dim)
        event = site_event(config, encoding, colluders=mechanism.colluders)
        ledger = PrivacyLedger.open(
            store.ensure().distributed_ledger_path,
            scope=mechanism.site_scope(store.site_id),
            budget=mechanism.budget(),
            accountant=mechanism.accountant,
        )
        ledger.check(event)  # BudgetExceededError: declined before training, nothing charged
        return cls(encoding, event, ledger, rotation_seed(session_id), config.round_id.hex())

    def release(self, update: np.ndarray) -> np.ndarray:
        """Encode ``update`` (clip, rotate, round, noise, ring), charge the ledger, and only then
        return the vector to mask. LocalProtocolError without data-dependent text for an update
        that cannot be encoded; BudgetExceededError if another process spent the budget since."""
        from fedcore.mechanisms.distributed_encoding import encode_site

        try:
            vector = encode_site(update, encoding=self.encoding, rotation_seed=self.seed)
        except FedcoreError:
            raise LocalProtocolError(
                "this site's update does not fit the distributed-DP encoding"
            ) from None
        self.ledger.charge(self.event, label=f"distributed-DP round {self.label}")
        return vector


def with_noisers(event: DistributedEvent, noisers: int) -> DistributedEvent:
    """``event`` with ``noisers`` honest noisers (the server's charge at the survivors' count)."""
    return dataclasses.replace(event, noisers=max(1, noisers))
