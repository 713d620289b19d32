"""The site-level epsilon against observers who know which sites took part in each round.

Theory of operation. DP-FedAvg's ``server_epsilon`` (the federation ledger) claims amplification by
sampling: a site is in a round with probability ``q``, and the observer does not learn whether it
was. That assumption fails for whoever learns the sample: the participants under secure
aggregation (the protocol lists them), the operator, anyone reading ``operator.jsonl``. Against
them a round the site took part in is the plain Gaussian mechanism with the round's noise
multiplier ``z`` (no amplification), and a round it did not take part in releases nothing about
it (its data did not enter the sum). So a site that took part in ``k`` rounds has the epsilon of
``GaussianEvent(z, count=k)`` (Dwork and Roth 2014, Thm A.1; Balle and Wang 2018 for the exact
Gaussian curve), and the record reports the maximum over sites: ``server_epsilon_sample_known``.

Across runs over the same federation the tally lives beside the federation ledger (in
``dp.server.state_dir``). Flower may give a site a new node id in each run, so the tally does not
match sites across runs: it adds, for every earlier run, the largest number of rounds any site took
part in. That is an upper bound on any one site's count, never an underestimate. Only those maxima
are written (the file says no more than ``server_epsilon_sample_known`` does); the per-site counts
of the current run stay in memory.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcore.federation.site.store import atomic_write, lock_file
from fedcore.privacy.accountant import AccountantKind, epsilon
from fedcore.privacy.events import PrivacyEvent, SelfComposedEvent
from fedcore.privacy.ledger import CorruptLedgerError

FORMAT = "fedcore.privacy.participation"
TALLY_FILE = "federation.participation.json"


@dataclass(slots=True)
class ParticipationTally:
    """How many rounds each site took part in, this run and (as maxima) earlier runs.

    ``path`` None keeps the tally in memory only (a preflight check).
    """

    path: Path | None
    run_id: str
    carried: int = 0  # sum over earlier runs of the most rounds any one site took part in
    counts: dict[str, int] = field(default_factory=dict)  # this run, in memory only

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None) -> ParticipationTally:
        """The tally at ``path`` (created on the first record), for a new run."""
        run_id = secrets.token_hex(8)
        if path is None:
            return cls(path=None, run_id=run_id)
        path = Path(path)
        runs = _read(path)
        carried = sum(runs.values())
        return cls(path=path, run_id=run_id, carried=carried)

    def max_rounds(self, *, extra: int = 0) -> int:
        """The most rounds any site may have taken part in (``extra`` more rounds for a check)."""
        return self.carried + max(self.counts.values(), default=0) + extra

    def record(self, participants: Iterable[object]) -> None:
        """Count one round for each participant (node ids), and persist the tally."""
        for node in participants:
            key = str(node)
            self.counts[key] = self.counts.get(key, 0) + 1
        if self.path is None:
            return
        with lock_file(self.path.with_name(f".{self.path.name}.lock")):
            runs = _read(self.path)
            runs[self.run_id] = max(self.counts.values(), default=0)
            doc = {"format": FORMAT, "runs": runs}
            atomic_write(self.path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def sample_known_epsilon(
    per_round: PrivacyEvent, *, rounds: int, delta: float, accountant: AccountantKind | str
) -> float:
    """Epsilon of ``rounds`` rounds of ``per_round`` (0.0 for none)."""
    if rounds <= 0:
        return 0.0
    return epsilon(
        [SelfComposedEvent(event=per_round, count=rounds)], delta=delta, accountant=accountant
    )


def _read(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    try:
        doc: Any = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptLedgerError(
            f"participation tally {str(path)!r} is unreadable: {exc}"
        ) from None
    runs = doc.get("runs") if isinstance(doc, dict) and doc.get("format") == FORMAT else None
    if not isinstance(runs, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in runs.values()
    ):
        raise CorruptLedgerError(f"participation tally {str(path)!r} is malformed")
    return runs
