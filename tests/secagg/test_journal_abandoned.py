"""A site joins a bounded number of rounds abandoned after the reveal (issue 21, point 2).

The attack: a colluding server runs the advertise and reveal stages, looks at the SecAgg+ graph,
and abandons the round whenever the graph does not put colluders around the target; in the
red-team run the graph it wanted came after 51 and 70 draws. Before this change
``RoundJournal.begin`` took any new round id, so every draw was free. Each test would fail there.
"""

from __future__ import annotations

import pytest

from fedcore.errors import ConfigError, LocalProtocolError
from fedcore.federation.site.abandoned import DAY_SECONDS, AbandonLimits
from fedcore.federation.site.journal import RoundJournal
from fedcore.federation.site.store import SiteStore

S = b"s" * 32
T0 = 1_700_000_000.0
LIMITS = AbandonLimits(per_run=4, per_day=16)


def _journal(tmp_path) -> RoundJournal:
    return RoundJournal.open_site(SiteStore(tmp_path / "site", 1))[1]


def _rid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def _abandon(journal: RoundJournal, i: int, *, run: str, now: float = T0, **kw) -> None:
    """A round the server ran to the reveal (the site bound its session) and then dropped."""
    journal.begin(_rid(i), run_id=run, now=now, **kw)
    journal.bind_session(_rid(i), S)


def test_grinding_the_ring_within_one_run_is_stopped_at_the_per_run_limit(tmp_path):
    """Attack: re-draw the graph by abandoning rounds of run r1; the fifth begin is refused,
    naming the node config key and the count, and the refusal leaves the journal unchanged."""
    journal = _journal(tmp_path)
    for i in range(4):
        _abandon(journal, i, run="r1", limits=LIMITS)
    before = journal.store.journal_path.read_bytes()
    with pytest.raises(LocalProtocolError, match=r"joined 4 rounds of run 'r1'.*per-run = 4"):
        journal.begin(_rid(9), run_id="r1", limits=LIMITS, now=T0)
    assert journal.store.journal_path.read_bytes() == before
    assert journal.entry(_rid(9)) is None
    journal.begin(_rid(10), run_id="r2", limits=LIMITS, now=T0)  # another run: 4 < 16 a day


def test_rounds_that_reached_the_masked_input_or_dropped_before_the_reveal_do_not_count(tmp_path):
    """An honest run: rounds that completed (masked input sent), rounds that ended before the
    site bound a session, and a run id that tries to look like a session line are not counted."""
    journal = _journal(tmp_path)
    for i in range(10):
        _abandon(journal, i, run="r1", limits=LIMITS)
        journal.mark(_rid(i), S, "trained")
        journal.mark(_rid(i), S, "masked")
    for i in range(10, 20):
        journal.begin(_rid(i), run_id="r1", limits=LIMITS, now=T0)  # dropped at the advert
    forged = 'x","session":"' + "00" * 32
    journal.begin(_rid(20), run_id=forged, limits=LIMITS, now=T0)
    for i in range(21, 24):
        _abandon(journal, i, run="r1", limits=LIMITS)
    journal.begin(_rid(30), run_id="r1", limits=LIMITS, now=T0)  # 3 abandoned < 4


def test_the_per_day_count_spans_runs_and_forgets_rounds_older_than_a_day(tmp_path):
    """Attack: a new run for every draw escapes the per-run count, not the per-day one; a day
    later the old rounds no longer count."""
    journal = _journal(tmp_path)
    limits = AbandonLimits(per_run=100, per_day=3)
    for i, run in enumerate(("a", "b", "c")):
        _abandon(journal, i, run=run, now=T0 + i, limits=limits)
    with pytest.raises(LocalProtocolError, match=r"joined 3 rounds in the last 24 h.*per-day = 3"):
        journal.begin(_rid(8), run_id="d", limits=limits, now=T0 + 10)
    later = T0 + DAY_SECONDS + 0.5  # round a (T0) is over a day old, b and c are not
    journal.begin(_rid(9), run_id="d", limits=limits, now=later)
    journal.bind_session(_rid(9), S)  # b, c and 9 abandoned within the day
    with pytest.raises(LocalProtocolError, match="joined 3 rounds in the last 24 h"):
        journal.begin(_rid(10), run_id="e", limits=limits, now=later + 0.1)


def test_without_limits_begin_behaves_as_before(tmp_path):
    journal = _journal(tmp_path)
    for i in range(30):
        _abandon(journal, i, run="r1")
    assert journal.begin(_rid(99), run_id="r1").session is None


@pytest.mark.parametrize(("per_run", "per_day"), [(0, 16), (4, -1), (True, 16), (4, 2.5)])
def test_a_limit_that_is_not_a_whole_number_of_at_least_one_is_refused(per_run, per_day):
    with pytest.raises(ConfigError, match="secagg-max-abandoned-per-"):
        AbandonLimits(per_run=per_run, per_day=per_day)
