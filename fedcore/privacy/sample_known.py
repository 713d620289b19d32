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

Which relation. Knowing the sample, an observer can tell whether a site exists at all, so this
epsilon does not hold for *add or remove one site*. With sensitivity ``C`` it holds for *zero-out*
(the site takes part and contributes a zero update: :attr:`SiteRelation.ZERO_OUT`); for
*replace-one* (its update swapped for any other, sensitivity ``2C``) the same rounds are the
Gaussian with the noise multiplier halved (:attr:`SiteRelation.REPLACE_ONE`).
:func:`sample_known_round_event` gives one round's event under either relation.

Realised and worst case. The maximum over sites of their actual participations depends on the
realised sample, which is exactly what the sample-known observer is assumed to know and what the
published record must not reveal. :meth:`ParticipationTally.epsilons` therefore gives two values:
``realised`` (the most-sampled site, for the operator) and ``worst_case`` (a site sampled in every
round released so far, a function of the schedule only, publishable).

Across runs over the same federation the tally lives beside the federation ledger (in
``dp.server.state_dir``). Flower may give a site a new node id in each run, so the tally does not
match sites across runs: it adds, for every earlier run, the largest number of rounds any site took
part in. That is an upper bound on any one site's count, never an underestimate. Only those maxima
are written (the file says no more than ``server_epsilon_sample_known`` does); the per-site counts
of the current run stay in memory. The tally also keeps, per run, how many rounds were released
(the worst case's count, which depends on no sample).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcore._files import atomic_write, lock_file
from fedcore.errors import ConfigError
from fedcore.privacy.accountant import AccountantKind, epsilon
from fedcore.privacy.events import GaussianEvent, PrivacyEvent, SelfComposedEvent
from fedcore.privacy.ledger_files import CorruptLedgerError
from fedcore.privacy.relations import SiteRelation

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
    carried_rounds: int = 0  # sum over earlier runs of the rounds they released
    rounds: int = 0  # rounds released in this run

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None) -> ParticipationTally:
        """The tally at ``path`` (created on the first record), for a new run."""
        run_id = secrets.token_hex(8)
        if path is None:
            return cls(path=None, run_id=run_id)
        path = Path(path)
        runs, rounds = _read(path)
        return cls(
            path=path,
            run_id=run_id,
            carried=sum(runs.values()),
            carried_rounds=sum(rounds.values()),
        )

    def max_rounds(self, *, extra: int = 0) -> int:
        """The most rounds any site may have taken part in (``extra`` more rounds for a check)."""
        return self.carried + max(self.counts.values(), default=0) + extra

    def worst_case_rounds(self, *, extra: int = 0) -> int:
        """The rounds a site sampled in every released round has taken part in, over every run
        of the tally (``extra`` more for a check): a count that depends on no sample."""
        return self.carried_rounds + self.rounds + extra

    def epsilons(
        self,
        per_round: GaussianEvent,
        *,
        delta: float,
        accountant: AccountantKind | str,
        relation: SiteRelation = SiteRelation.ZERO_OUT,
    ) -> SampleKnownEpsilons:
        """The sample-known epsilon now, realised and worst case, for ``per_round`` (one round's
        event under ``relation``: :func:`sample_known_round_event`)."""
        return SampleKnownEpsilons(
            relation=relation,
            realised=sample_known_epsilon(
                per_round, rounds=self.max_rounds(), delta=delta, accountant=accountant
            ),
            worst_case=sample_known_epsilon(
                per_round, rounds=self.worst_case_rounds(), delta=delta, accountant=accountant
            ),
        )

    def record(self, participants: Iterable[object]) -> None:
        """Count one round for each participant (node ids), and persist the tally."""
        for node in participants:
            key = str(node)
            self.counts[key] = self.counts.get(key, 0) + 1
        self.rounds += 1
        if self.path is None:
            return
        with lock_file(self.path.with_name(f".{self.path.name}.lock")):
            runs, rounds = _read(self.path)
            runs[self.run_id] = max(self.counts.values(), default=0)
            rounds[self.run_id] = self.rounds
            doc = {"format": FORMAT, "runs": runs, "rounds": rounds}
            atomic_write(self.path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


@dataclass(frozen=True, slots=True)
class SampleKnownEpsilons:
    """The sample-known site-level epsilon after the rounds released so far, under ``relation``.

    ``realised``: the most-sampled site's (depends on the realised sample: for the operator).
    ``worst_case``: a site sampled in every released round (depends on the schedule only: the
    bound the public record can carry). ``realised <= worst_case`` always.
    """

    relation: SiteRelation
    realised: float
    worst_case: float


def sample_known_round_event(*, noise_multiplier: float, relation: SiteRelation) -> GaussianEvent:
    """One round for a participating site against an observer who knows the sample, with the
    update noise ``noise_multiplier * C``: the Gaussian mechanism without amplification, of
    sensitivity ``C`` under zero-out and ``2C`` under replace-one (noise multiplier halved).

    Raises :class:`ConfigError` for :attr:`SiteRelation.ADD_REMOVE`, for which no sample-known
    epsilon holds (knowing the sample reveals whether a site exists), or a bad noise multiplier.
    """
    if not isinstance(relation, SiteRelation):
        raise ConfigError(f"relation must be a SiteRelation, got {relation!r}")
    if relation is SiteRelation.ADD_REMOVE:
        raise ConfigError(
            "no sample-known epsilon holds for add or remove one whole site: an observer who "
            "knows the sample knows whether the site exists; use zero-out or replace-one"
        )
    return GaussianEvent(noise_multiplier=float(noise_multiplier) / relation.sensitivity_factor)


def worst_case_sample_known_epsilon(
    per_round: GaussianEvent, *, rounds: int, delta: float, accountant: AccountantKind | str
) -> float:
    """After ``rounds`` released rounds, the largest sample-known epsilon any sample can give: a
    site sampled in all of them. It depends on no sample, so it may be published."""
    return sample_known_epsilon(per_round, rounds=rounds, delta=delta, accountant=accountant)


def sample_known_epsilon(
    per_round: PrivacyEvent, *, rounds: int, delta: float, accountant: AccountantKind | str
) -> float:
    """Epsilon of ``rounds`` rounds of ``per_round`` (0.0 for none)."""
    if rounds <= 0:
        return 0.0
    return epsilon(
        [SelfComposedEvent(event=per_round, count=rounds)], delta=delta, accountant=accountant
    )


def _read(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """The tally's runs (the most rounds any site took part in, per run) and rounds released per
    run. A tally written before the rounds were kept counts each old run's maximum instead: the
    only count it holds, which may be below what that run released."""
    if not path.exists():
        return {}, {}
    try:
        doc: Any = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptLedgerError(
            f"participation tally {str(path)!r} is unreadable: {exc}"
        ) from None
    ours = isinstance(doc, dict) and doc.get("format") == FORMAT
    runs = _counts(doc.get("runs")) if ours else None
    rounds = _counts(doc.get("rounds", {})) if ours else None
    if runs is None or rounds is None:
        raise CorruptLedgerError(f"participation tally {str(path)!r} is malformed")
    return runs, {run: rounds.get(run, most) for run, most in runs.items()}


def _counts(value: object) -> dict[str, int] | None:
    """``value`` if it maps names to non-negative integers, else None."""
    if isinstance(value, dict) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value.values()
    ):
        return {str(k): v for k, v in value.items()}
    return None
