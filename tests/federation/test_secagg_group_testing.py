"""One site cannot veto every secure-aggregation round (issue 21, point 6): group testing.

Attack: a site adds 2^30 to the weight coordinate of its masked input in every round. Before
group testing every round's decoded sum was implausible and discarded, nobody was named, and the
model never moved. Now later rounds hold out half the suspects each (binary splitting), and the
cheater is named and excluded within ceil(log2 n) + 1 further rounds.
"""

from __future__ import annotations

import json
import math
import random

from fedcore.config import resolve
from fedcore.federation.server.serve import run_server
from fedcore.federation.server.suspects import GroupTesting
from tests.federation.conftest import FakeGrid, honest
from tests.federation.test_secagg_robustness import shift_weight, tampering

EIGHT = tuple(range(201, 209))
CHEATER = 206


def _run(tmp_path, behaviours, *, rounds):
    out = tmp_path / "run"
    settings = resolve(
        overrides=[
            f"sites={len(EIGHT)}",
            f"rounds={rounds}",
            "local_epochs=1",
            "secagg.timeout=5",
            "secagg.enabled=true",
            # a test can discard ceil(log2 8) + 1 rounds in a row, and the driver counts a
            # discarded round as failed (default: the run fails after 3 in a row)
            "max_failed_rounds=10",
            f"out={out}",
        ]
    )
    grid = FakeGrid(settings, {n: behaviours.get(n, honest) for n in EIGHT})
    run_server(grid, settings, out)
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_a_site_that_wraps_every_rounds_weight_is_named_and_then_rounds_release(tmp_path):
    """Attacks the veto: one site spoils every sum. Before: every row has "decoded sum discarded"
    and no node id in failures. After: named by round 1 + ceil(log2 8) + 2, then released."""
    # the first discard, then the test (one more: the last suspect cannot run a round alone)
    bound = 1 + math.ceil(math.log2(len(EIGHT))) + 2
    rows = _run(
        tmp_path, {CHEATER: tampering("masked_input", shift_weight(1 << 30))}, rounds=bound + 2
    )
    assert "decoded sum discarded" in rows[0]["failures"]["round"]
    named = [r["round"] for r in rows if "group testing" in r["failures"].get(str(CHEATER), "")]
    assert len(named) == 1 and named[0] <= bound, [r["failures"] for r in rows]
    for row in rows:  # no honest site is ever named
        assert not {str(n) for n in EIGHT if n != CHEATER} & set(row["failures"])
    later = [r for r in rows if r["round"] > named[0]]
    assert later
    for row in later:  # the cheater is left out, and every later round is released
        assert "round" not in row["failures"]
        assert CHEATER not in row["secagg"]["survivors"] and len(row["secagg"]["survivors"]) == 7
        assert row["num_examples"] > 0
    assert later[-1]["eval_loss"] != rows[0]["eval_loss"]  # the model moved


# -- the suspects alone, against adversaries that choose when to cheat ------------------------


def _play(cheats, *, sites=16, rounds=60, seed=0, floor=2):
    """Run ``rounds`` rounds of group testing over ``sites`` sites with one cheater (site 0 of a
    shuffled federation). ``cheats(round, tested)`` says whether the cheater spoils the round it
    takes part in; a round needs ``floor`` sites. Returns (the cheater, rounds discarded after the
    first, the round it was named or None, every node id named)."""
    rng = random.Random(seed)
    population = list(range(100, 100 + sites))
    cheater = rng.choice(population)
    testing = GroupTesting(rng=random.Random(seed + 1))  # the CSPRNG, seeded for the test
    discards, named_at, named = 0, None, []
    for rnd in range(1, rounds + 1):
        nodes = testing.admit(population, population, runs=lambda n: n >= floor)
        tested = cheater in testing.tested
        spoiled = cheater in nodes and cheats(rnd, tested)
        discards += spoiled and rnd > 1
        for node in testing.learn(released=not spoiled, server_round=rnd):
            named.append(int(node))
            named_at = rnd
    return cheater, discards, named_at, named


def test_a_cheater_that_always_cheats_is_named_within_the_bound():
    """Attacks the bound: ceil(log2 16) + 1 = 5 further rounds after the first discard, one more
    where the protocol's floor of 2 sites makes a cleared site join the last test."""
    for seed in range(40):
        cheater, _, named_at, named = _play(lambda rnd, tested: True, seed=seed, floor=1)
        assert named == [cheater] and named_at <= 1 + 5
        cheater, _, named_at, named = _play(lambda rnd, tested: True, seed=seed)
        assert named == [cheater] and named_at <= 1 + 5 + 1


def test_a_cheater_that_cheats_only_when_tested_stops_few_rounds_and_frames_nobody():
    """Attacks soundness and availability: a site that cheats only inside the tested group (and
    in the first round). It is named, having spoiled at most ceil(log2 16) rounds after the first."""
    for seed in range(20):
        cheater, discards, named_at, named = _play(
            lambda rnd, tested: rnd == 1 or tested, seed=seed
        )
        assert named == [cheater] and discards <= 4


def test_a_cheater_that_cheats_every_other_round_frames_nobody_and_is_named():
    """Attacks framing: cheating on odd rounds only, it is cleared by the even rounds' releases;
    still no honest site is ever named, and it is named, having spoiled at most ceil(log2 16)
    rounds while tested and one round in three outside tests."""
    for seed in range(20):
        cheater, discards, named_at, named = _play(
            lambda rnd, tested: rnd % 2 == 1, rounds=120, seed=seed
        )
        assert named == [cheater] and discards <= 4 + named_at / 3


def test_a_cheater_that_cheats_only_outside_tests_stops_at_most_one_round_in_three():
    """Attacks availability: it cheats only when no test runs (never tested), so it is never
    named; each of its discards restarts a test that releases two rounds at least."""
    rounds = 120
    for seed in range(20):
        _, discards, _, named = _play(lambda rnd, tested: not tested, rounds=rounds, seed=seed)
        assert named == [] and 0 < discards <= rounds / 3


def test_too_small_a_federation_holds_out_fewer_sites_rather_than_skip():
    """Attacks the skip: 3 sites, a round needs 3, so nothing may be held out; the round runs."""
    testing = GroupTesting(rng=random.Random(3))
    everyone = [1, 2, 3]
    assert testing.admit(everyone, everyone, runs=lambda n: n >= 3) == (1, 2, 3)
    testing.learn(released=False, server_round=1)
    assert testing.admit(everyone, everyone, runs=lambda n: n >= 3) == (1, 2, 3)
    assert testing.admit(everyone, everyone, runs=lambda n: n >= 2) != (1, 2, 3)  # one held out
