"""A site's record-level privacy ledger: where it lives, and how it is opened.

The ledger is the site's accountant history across rounds and across runs. Flower ClientApps are
short-lived (a fresh process per message in deployment), so it lives on the site's disk, never in a
privacy engine rebuilt every round: ``<state-dir>/site-<id>.ledger.json``, where ``state-dir`` is
the node config's ``state-dir`` (a site's own directory in deployment) or, in simulation, where
every site shares this machine, ``<run record>/sites``. Each charge is written atomically before it
takes effect (:class:`~fedcore.privacy.PrivacyLedger`), under the ledger's OS lock, followed by
its seal; a ledger that is missing while the site's key or round journal exists, or older than its
seal, refuses to open (:class:`~fedcore.errors.LedgerLostError`) until ``fedcore ledger reset``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcore.config import Settings
from fedcore.data import SiteData
from fedcore.errors import BudgetExceededError, ConfigError
from fedcore.federation.site.store import SiteStore
from fedcore.protections import RecordLevel, protections_of

if TYPE_CHECKING:
    from fedcore.privacy import PrivacyLedger


SIMULATION_MARKER = "FEDCORE_SIMULATION"  # set by fedcore's simulation, in its own process env
SIMULATION_KEYS = frozenset({"partition-id", "num-partitions"})  # what Flower's simulation sets


def node_int(node_config: Mapping[str, Any], key: str, default: int, *, least: int) -> int:
    """An integer of the operator's node config (a digit string is read as one), at least
    ``least``; ``default`` when absent. Raises ConfigError naming the key."""
    value = node_config.get(key, default)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"node config {key!r} must be an integer >= {least}, got {value!r}")
    return value


def simulated_process() -> bool:
    """Whether this process runs inside fedcore's simulation (its environment says so; the run
    config cannot reach it)."""
    return os.environ.get(SIMULATION_MARKER) == "1"


def is_simulated(node_config: Mapping[str, Any]) -> bool:
    """Whether this site runs inside fedcore's simulation, where the server and every site share
    one machine and one person: fedcore's simulation marked this process (the environment, which
    the run config cannot reach) and the node config holds only the keys Flower's simulation
    engine sets. A deployed SuperNode has the operator's node config and environment."""
    return simulated_process() and set(node_config) <= SIMULATION_KEYS


def site_state_dir(settings: Settings, node_config: Mapping[str, Any]) -> Path:
    """The directory that holds a site's privacy state (secure-aggregation key and round journal,
    record-level ledger): the node config's ``state-dir``. Only in simulation, where every site
    shares this machine, ``<run record>/sites``; a deployed site never falls back to the run
    config's ``out``, which the server chooses. Raises :class:`ConfigError` if none is known."""
    if state := node_config.get("state-dir"):
        return Path(str(state))
    if is_simulated(node_config) and settings.out:
        return run_sites_dir(settings)
    raise ConfigError(
        "a site with secure aggregation or record-level DP needs a place for its keys, round "
        "journal and privacy ledger: set the node config's 'state-dir' (a folder on the site's "
        "own disk)"
    )


def run_sites_dir(settings: Settings) -> Path:
    """``<run record>/sites``: the server's view of the sites' folder (simulation: the sites' own
    state; deployment: the registry copy the server reads). Raises ConfigError without ``out``."""
    if not settings.out:
        raise ConfigError("the 'out' setting is empty: there is no run record folder")
    return Path(settings.out) / "sites"


def record_level(settings: Settings) -> RecordLevel:
    """The run's record-level DP (:attr:`fedcore.protections.Protections.record`). Raises
    :class:`ConfigError` when it is off."""
    record = protections_of(settings).record
    if record is None:
        raise ConfigError("setting 'dp.site.epsilon' is unset: record-level DP is off")
    return record


def site_ledger(
    settings: Settings, *, site_id: int, node_config: Mapping[str, Any]
) -> PrivacyLedger:
    """Open (or create) site ``site_id``'s record-level ledger with the run's budget.

    Raises :class:`ConfigError` if record-level DP is off or the file holds another budget or
    accountant, :class:`~fedcore.privacy.CorruptLedgerError` for a damaged file (left untouched),
    :class:`~fedcore.errors.LedgerLostError` for a lost or rolled-back ledger.
    """
    # Imported here: dp-accounting (through scipy) costs seconds, and in deployment every message
    # to a site starts a fresh ClientApp process; only sites with record-level DP pay for it.
    from fedcore.privacy import PrivacyLedger

    record = record_level(settings)
    store = SiteStore(site_state_dir(settings, node_config), site_id).ensure()
    return PrivacyLedger.open(
        store.ledger_path,
        scope=record.scope(site_id),
        budget=record.budget(),
        accountant=record.accountant,
        released=store.has_released(),
    )


@dataclass(frozen=True, slots=True)
class SiteDeclined:
    """The site will not train this round: its record-level budget cannot afford it."""

    site_epsilon: float
    reason: str
    site_charges: int | None = None  # the ledger's entries (the federation's receipts)


def affordability(
    settings: Settings, site: SiteData, *, node_config: Mapping[str, Any]
) -> SiteDeclined | None:
    """Whether the site's record-level budget affords this round (None: it does, or DP is off).

    Lets a site decline before a multi-stage protocol (secure aggregation) starts, rather than
    after it has joined. Charges nothing.
    """
    record = protections_of(settings).record
    if record is None:
        return None
    from fedcore.privacy.dpsgd_plan import plan_round

    ledger = site_ledger(settings, site_id=site.site_id, node_config=node_config)
    plan = plan_round(record.dp_config(), num_examples=len(site.train.y), ledger=ledger)
    try:
        ledger.check(plan.event)
    except BudgetExceededError as exc:
        return SiteDeclined(
            site_epsilon=ledger.epsilon(), reason=str(exc), site_charges=len(ledger.entries)
        )
    return None


def check_site_round(
    settings: Settings, *, num_examples: int, site_id: int, exact: bool = True
) -> None:
    """Refuse before the run a record-level budget that one round cannot afford (issue 11,
    point 6), with the cost of one round in the message. A calibrated noise multiplier always
    affords its planned rounds; an explicit one may not. Raises :class:`ConfigError`.

    A quick lower bound on the round's cost (:func:`~fedcore.privacy.accountant.epsilon_lower_bound`,
    tenths of a second where the accountant can take seconds) is tried first: above the budget,
    the accountant's cost is too, and the round is refused at once. ``exact=False`` stops there
    (nothing is accepted on a lower bound, only refused)."""
    dp = protections_of(settings).record
    if dp is None or num_examples < 1:
        return
    from fedcore.privacy import PrivacyLedger, epsilon
    from fedcore.privacy.accountant import epsilon_lower_bound
    from fedcore.privacy.dpsgd_plan import plan_round

    ledger = PrivacyLedger(scope=dp.scope(site_id), budget=dp.budget(), accountant=dp.accountant)
    plan = plan_round(dp.dp_config(), num_examples=num_examples, ledger=ledger)
    low = epsilon_lower_bound([plan.event], delta=dp.delta)
    if low <= dp.epsilon and not exact:
        return
    at_least = "at least " if low > dp.epsilon else ""
    cost = low if at_least else epsilon([plan.event], delta=dp.delta, accountant=dp.accountant)
    if not cost <= dp.epsilon:
        raise ConfigError(
            f"dp.site.epsilon={dp.epsilon:g} cannot afford one round at site {site_id}: one round "
            f"({plan.steps} DP-SGD steps at sampling rate {plan.sample_rate:.4g}, noise multiplier "
            f"{plan.noise_multiplier:.4g}) costs epsilon {at_least}{cost:.4g}; raise the budget or "
            "the noise"
        )
