"""How many rounds abandoned after the reveal a site joins: the bound against ring grinding.

A server can run a SecAgg+ round to the reveal, see the neighbour graph (the ring), and abandon
the round to draw another until colluders surround a target (issue 21, point 2; about 60 draws
were needed). A round is *abandoned after the reveal* when the site's journal holds a ``session``
for it and no ``masked`` input. :meth:`fedcore.federation.site.journal.RoundJournal.begin` counts
them with :func:`check_abandoned` and refuses a new round past :class:`AbandonLimits`, which the
operator sets in the node config (:func:`abandon_limits`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedcore.errors import ConfigError, LocalProtocolError
from fedcore.federation.site.folders import node_int

DAY_SECONDS = 86_400.0
NODE_MAX_ABANDONED_PER_RUN = "secagg-max-abandoned-per-run"
NODE_MAX_ABANDONED_PER_DAY = "secagg-max-abandoned-per-day"


@dataclass(frozen=True, slots=True)
class AbandonLimits:
    """How many rounds abandoned after the reveal a site joins before it refuses new ones.

    ``per_run`` counts the rounds of one fedcore run (node config ``secagg-max-abandoned-per-run``),
    ``per_day`` the rounds of any run begun in the last 24 h (``secagg-max-abandoned-per-day``).
    Defaults: the ring attack of issue 21 needed 51 and 70 draws of the graph (about 1 in 60 per
    draw), so a run gives a grinding server at most 5 draws (about 8 % to succeed) and a day 17;
    an honest run in which a few rounds drop after the reveal is not stopped. Raises ConfigError
    for a limit that is not a whole number of at least 1.
    """

    per_run: int = 4
    per_day: int = 16

    def __post_init__(self) -> None:
        for key, value in (
            ("secagg-max-abandoned-per-run", self.per_run),
            ("secagg-max-abandoned-per-day", self.per_day),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be a whole number of at least 1, got {value!r}")


def abandon_limits(node_config: Mapping[str, Any]) -> AbandonLimits:
    """The bound from the operator's node config (defaults: :class:`AbandonLimits`). Raises
    ConfigError naming a bad value."""
    default = AbandonLimits()
    return AbandonLimits(
        per_run=node_int(node_config, NODE_MAX_ABANDONED_PER_RUN, default.per_run, least=1),
        per_day=node_int(node_config, NODE_MAX_ABANDONED_PER_DAY, default.per_day, least=1),
    )


def check_abandoned(
    data: bytes, *, run_id: str | None, limits: AbandonLimits, now: float, skip: int = 0
) -> None:
    """Raise LocalProtocolError if the rounds abandoned after the reveal (a session, no masked
    input) of run ``run_id``, or begun in the 24 h before ``now``, reached ``limits``. Two scans of
    the journal (after its first ``skip`` bytes, the header); only the begin lines of abandoned
    rounds are parsed (ValueError if one fails)."""
    bound = _first_events(data, b"session", skip)
    abandoned = []
    for rid in bound.keys() - _first_events(data, b"masked", skip):
        start = data.rfind(b'{"round":"' + rid + b'","nonce":', 0, bound[rid])
        if start >= 0:
            record = json.loads(data[start : data.index(b"\n", start)])
            abandoned.append((record.get("run"), record.get("at")))
    per_run = sum(run_id is not None and run == run_id for run, _ in abandoned)
    per_day = sum(type(at) in (int, float) and at > now - DAY_SECONDS for _, at in abandoned)
    for count, limit, key, where in (
        (per_run, limits.per_run, "secagg-max-abandoned-per-run", f"of run {run_id!r}"),
        (per_day, limits.per_day, "secagg-max-abandoned-per-day", "in the last 24 h"),
    ):
        if count >= limit:
            raise LocalProtocolError(
                f"refused: this site already joined {count} round{'s' if count != 1 else ''} {where} "
                "that were abandoned "
                f"after the reveal ({key} = {limit}); a server that abandons rounds can re-draw "
                "the SecAgg+ graph until it suits it"
            )


def _first_events(lines: bytes, event: bytes, skip: int) -> dict[bytes, int]:
    """Round id (hex) to where its last line whose first event is ``event`` lies (a ``find`` scan:
    a ``","`` outside a JSON string is structure, so only such a line matches)."""
    found = {}
    marker = b'","' + event + b'":'
    pos = lines.find(marker, skip)
    while pos >= 0:
        start = lines.rfind(b'{"round":"', 0, pos) + len(b'{"round":"')
        found[lines[start:pos]] = pos
        pos = lines.find(marker, pos + 1)
    return found
