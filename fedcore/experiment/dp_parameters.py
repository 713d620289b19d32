"""What a run's DP mechanism was, read back from its ``privacy.json``: the figures a paper states
next to an epsilon (delta, noise multiplier, sampling rate, steps).

The ledgers in ``privacy.json`` hold every charged event (:mod:`fedcore.privacy.events`, as JSON):
a Gaussian event, possibly Poisson- or fixed-size-subsampled, possibly inside a composed or
self-composed event, beside events that are no Gaussian (a secure-aggregation round's
``revealed_with_probability``, which is accounted out of delta). The figures are the Gaussian
leaves': the noise multiplier and sampling rate of the last one (a calibrated run charges the same
one every round), and the steps summed over all of them.

- Record-level DP (DP-SGD): the site whose epsilon is the largest (the one ``record ε`` reports);
  its steps are DP-SGD steps over the run, its sampling rate the Poisson rate of its batches.
- Site-level DP (DP-FedAvg): the federation's ledger; its steps are the rounds charged, its
  sampling rate the rate at which sites are sampled.
- Distributed DP (discrete Gaussian or Skellam shares added by the sites): the federation's
  ledger too; its noise multiplier is the summed honest noise's standard deviation over the
  sum's L2 sensitivity (both in ring units), its sampling rate 1 (no amplification is claimed
  against the server, which knows the sample), its steps the rounds charged.

Read tolerantly: a field that is absent or malformed gives None (a record of another fedcore
version, a run stopped before it closed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Level = Literal["record", "server"]
GAUSSIAN_KINDS = ("gaussian", "poisson_subsampled_gaussian", "fixed_size_subsampled_gaussian")
DISTRIBUTED_KINDS = ("distributed_discrete_gaussian", "skellam")  # fedcore.privacy.distributed
MAX_DEPTH = 16  # composed events nest a few levels at most; a deeper one is malformed


@dataclass(frozen=True, slots=True)
class DPParameters:
    """The figures of one run's binding DP mechanism; None where the record does not give them."""

    delta: float | None = None
    noise_multiplier: float | None = None
    sampling_rate: float | None = None
    steps: int | None = None


NO_DP = DPParameters()


def read_dp_parameters(folder: Path, *, level: Level) -> DPParameters:
    """The DP figures of the run record in ``folder`` for ``level`` (``"record"``: DP-SGD at the
    sites; ``"server"``: DP-FedAvg); :data:`NO_DP` if ``privacy.json`` is absent or unreadable."""
    try:
        doc = json.loads((folder / "privacy.json").read_text())
    except (OSError, ValueError):
        return NO_DP
    if not isinstance(doc, dict):
        return NO_DP
    if level == "record":
        budget, ledger = doc.get("site_budget"), _largest_site_ledger(doc.get("sites"))
    else:
        budget, ledger = doc.get("server_budget"), doc.get("federation")
    delta = _number(budget.get("delta")) if isinstance(budget, dict) else None
    if delta is None and isinstance(ledger, dict) and isinstance(ledger.get("budget"), dict):
        delta = _number(ledger["budget"].get("delta"))
    leaves = list(_leaves_of(ledger))
    if not leaves:
        return DPParameters(delta=delta)
    last, _ = leaves[-1]
    return DPParameters(
        delta=delta,
        noise_multiplier=_number(last.get("noise_multiplier")),
        sampling_rate=_sampling_rate(last),
        steps=sum(count for _, count in leaves),
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 1


def _entries(ledger: Any) -> list[Mapping[str, Any]]:
    entries = ledger.get("entries") if isinstance(ledger, dict) else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _largest_site_ledger(sites: Any) -> Mapping[str, Any] | None:
    """The ledger of the site whose last charge left the largest epsilon."""
    if not isinstance(sites, dict):
        return None
    best, best_eps = None, -math.inf
    for ledger in sites.values():
        entries = _entries(ledger)
        eps = _number(entries[-1].get("epsilon_after")) if entries else None
        if eps is not None and eps > best_eps:
            best, best_eps = ledger, eps
    return best


def _leaves_of(ledger: Any) -> Iterator[tuple[Mapping[str, Any], int]]:
    for entry in _entries(ledger):
        yield from _gaussian_leaves(entry.get("event"), times=1, depth=0)


def _gaussian_leaves(
    event: Any, *, times: int, depth: int
) -> Iterator[tuple[Mapping[str, Any], int]]:
    """Every Gaussian leaf of ``event`` with the number of times it ran."""
    if not isinstance(event, dict) or depth > MAX_DEPTH:
        return
    kind = event.get("kind")
    if kind == "self_composed":
        yield from _gaussian_leaves(
            event.get("event"), times=times * _count(event.get("count")), depth=depth + 1
        )
    elif kind == "composed" and isinstance(event.get("events"), list):
        for inner in event["events"]:
            yield from _gaussian_leaves(inner, times=times, depth=depth + 1)
    elif kind in GAUSSIAN_KINDS:
        yield event, times * _count(event.get("count"))
    elif kind in DISTRIBUTED_KINDS:
        yield _distributed_as_gaussian(event), times * _count(event.get("count"))


def _distributed_as_gaussian(event: Mapping[str, Any]) -> Mapping[str, Any]:
    """A distributed-DP event as the Gaussian leaf it is compared with: the noise multiplier of
    the sum, the standard deviation of the honest noisers' summed noise over the L2 sensitivity
    (``sqrt(noisers) sigma / Delta_2`` for the discrete Gaussian, ``sqrt(noisers mu) / Delta_2``
    for Skellam, KLS21 / AKL21), and no sampling (the server knows the sample)."""
    noisers, l2 = _number(event.get("noisers")), _number(event.get("l2_sensitivity"))
    if event.get("kind") == "skellam":
        mu = _number(event.get("mu"))
        variance = None if mu is None or noisers is None else noisers * mu
    else:
        sigma = _number(event.get("sigma"))
        variance = None if sigma is None or noisers is None else noisers * sigma**2
    multiplier = None
    if variance is not None and variance >= 0 and l2:
        multiplier = math.sqrt(variance) / l2
    return {"kind": "gaussian", "noise_multiplier": multiplier}


def _sampling_rate(leaf: Mapping[str, Any]) -> float | None:
    kind = leaf.get("kind")
    if kind == "gaussian":
        return 1.0
    if kind == "fixed_size_subsampled_gaussian":
        size, population = _number(leaf.get("sample_size")), _number(leaf.get("population_size"))
        return size / population if size is not None and population else None
    return _number(leaf.get("sampling_rate"))
