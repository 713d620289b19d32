"""Group testing over later rounds: the site whose input makes secure-aggregation sums implausible
is found and excluded, so one site cannot veto every round.

Theory of operation. A decoded sum that honest sites cannot produce
(:func:`~fedcore.federation.server.secagg_sums.check_plausible`, or the clipped sum's own check
under site-level DP) is discarded, and the sum alone cannot say whose input broke it. Adaptive
group testing by binary splitting (Hwang, "A method for detecting all defective members in a
population by group testing", JASA 1972) asks later rounds instead: each round runs without part
of the suspects, and whether it is released says on which side the culprit is.

State: ``within``, the sites let into every discarded round since the evidence began (a test
starts from the whole federation), and ``cleared``, those of them tested in a released round since
the last discard. The suspects are ``within - cleared``. While there are suspects a test runs:
each round draws the tested group ``G`` (half the suspects, at least one) from a CSPRNG, so a
culprit cannot predict it, and holds out every other member of ``within``, cleared ones included
(a cheater once cleared must not spoil rounds it is not tested in); the other sites take part as
usual.

- round discarded: some site of the round cheated, so ``within`` keeps only the sites it let in
  (``G`` while a test runs; a discard that leaves nobody starts the evidence again) and ``cleared``
  only those of them tested; when one site is left it is named (``failures``, under its node id)
  and excluded from every later round of the run, and the evidence is forgotten;
- round released: ``G`` is cleared (a culprit that always cheats was not in it). When every member
  of ``within`` is cleared the test ends (a culprit that cheated once and stopped costs only the
  rounds it took to clear everyone) and rounds run as usual; ``within`` is kept, and the next
  discard resumes the test from it.

Bound. Against a site that cheats whenever it takes part, the suspects (which keep the culprit)
shrink each round to at most ``ceil(|S| / 2)`` (either half), so after ``ceil(log2 |S|)`` rounds
it is the culprit alone; it was named then if that round was discarded, else the next round tests
it alone, is discarded, and names it: at most ``ceil(log2 |S|) + 1`` further rounds, ``|S|`` the
sites of the federation when the test began (counting rounds in which the culprit is sampled, and
while the protocol can run without the held-out sites, below).
An adaptive cheater can cheat only sometimes: held out, it cannot cheat; tested, it either cheats
(the round is discarded and ``within`` at least halves, since ``|G| <= ceil(|within| / 2)``) or
behaves (the round is released). So it spoils at most ``ceil(log2 |S|)`` rounds of a test before it
is named, and each time it is cleared it had to behave in a released round. Left unnamed, it can
only cheat when no test runs: each such discard restarts the test, which then lasts until every
member of ``within`` (two at least) has been tested in a released round, so it spoils at most one
round in three (while half can be held out), and any cheat while tested brings it nearer its name.

Too few sites. When holding out ``within - G`` would leave the federation too small for the
protocol (``runs``), fewer sites are held out rather than the round skipped: cleared sites first,
then untested suspects, each drawn at random, and they count as tested. Naming stays sound, and
the suspects still halve, but ``within`` keeps the sites let back in, so naming can take one more
round for each discarded round that let some back in. With a floor of 2 sites this happens only
when the test is down to one suspect and every site is in ``within`` (a round of that suspect alone
cannot run): then at most ``ceil(log2 |S|) + 2`` further rounds. A cheater let back in while
cleared shrinks ``within`` by only the sites still held out (at least one), not by half.

Privacy under site-level DP (:class:`~fedcore.federation.server.secagg_sums.NoisedSum`, Poisson
sampling at rate ``q``). Who is held out is a function of the federation's node ids, of which
earlier rounds were discarded or released, and of fresh CSPRNG draws; never of who was sampled or
survived (so the sets above are of sites let in, not survivors), and it is sized on the
federation, not on this round's sample. An honest site clips before it encodes, so its data never
makes a round implausible. So each round is a Poisson sample at rate ``q`` of the sites not held
out and at rate 0 of the others: excluding sites only lowers a site's inclusion probability,
chosen from the past before the sample is drawn, and the round's Poisson-subsampled Gaussian
event still bounds it (adaptive composition allows the choice to depend on the past). Not
covered: the skip probability the ledger charges (:mod:`fedcore.privacy.skips`) is computed for
the whole federation, and a round with ``h`` sites held out or excluded skips with the
probability for ``N - h`` sites.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

__all__ = ["GroupTesting"]


@dataclass(slots=True)
class GroupTesting:
    """Binary splitting over later rounds (module docstring). Call :meth:`admit` once per round
    with its sample, then :meth:`learn` once the round was released or discarded (a round that
    ended otherwise tells nothing: the next :meth:`admit` draws a new group). ``rng``: the
    operating system's CSPRNG unless a test injects a seeded one."""

    rng: random.Random = field(default_factory=secrets.SystemRandom)
    excluded: dict[int, str] = field(default_factory=dict)  # named sites and why
    within: frozenset[int] = frozenset()  # let into every discarded round since ``since``
    cleared: frozenset[int] = frozenset()  # of ``within``, tested in a released round
    tested: frozenset[int] = frozenset()  # this round's members of ``within`` (G and let back in)
    allowed: frozenset[int] = frozenset()  # the federation minus this round's held-out sites
    since: int = 0  # the round whose discard began the evidence

    @property
    def suspects(self) -> frozenset[int]:
        """The sites a culprit that keeps cheating can still be (empty: no test runs)."""
        return self.within - self.cleared

    def admit(
        self,
        population: Collection[int],
        sampled: Sequence[int],
        *,
        runs: Callable[[int], bool],
    ) -> tuple[int, ...]:
        """The sites this round runs with: ``sampled`` minus the excluded sites and, while a test
        runs, minus the members of ``within`` not drawn into this round's group. The group is drawn
        and sized from ``population`` (every site of the federation) and the past only; ``runs(n)``
        says whether a round of ``n`` sites can run."""
        everyone = frozenset(population) - self.excluded.keys()
        held: list[int] = []
        if suspects := sorted(self.suspects):
            group = frozenset(self.rng.sample(suspects, max(1, len(suspects) // 2)))
            spare = sorted((self.within - group) & self.cleared)  # let back in first
            held = sorted(self.within - group - self.cleared)
            self.rng.shuffle(spare)
            self.rng.shuffle(held)
            held += spare
            while held and not runs(len(everyone) - len(held)):  # hold out fewer, not skip
                held.pop()
        self.allowed = everyone - frozenset(held)
        self.tested = (self.within & self.allowed) if suspects else frozenset()
        return tuple(n for n in sampled if n in self.allowed)

    def learn(self, *, released: bool, server_round: int) -> dict[str, str]:
        """Update the evidence with the outcome of the round :meth:`admit` planned: released, or
        discarded as implausible. Returns the site named in this round (node id to reason), as
        ``failures`` spells it; empty when none is."""
        tested, self.tested = self.tested, frozenset()
        if released:
            self.cleared |= tested
            return {}
        within = self.within & self.allowed
        if not within:  # no evidence yet, or a culprit outside it: start from this round
            within, self.since = self.allowed, server_round
        self.within, self.cleared = within, self.cleared & tested
        if len(within) != 1:
            return {}
        (culprit,) = within
        why = (
            f"excluded: its input made rounds {self.since}..{server_round} implausible "
            "(group testing); left out of every later round"
        )
        self.excluded[culprit] = why
        self.within, self.cleared = frozenset(), frozenset()
        return {str(culprit): why}
