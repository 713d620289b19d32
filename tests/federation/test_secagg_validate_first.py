"""Issue 21, points 3 and 4, as attacks through the real site path: a server that makes a DP-SGD
site train and charge without receiving anything (parameters that fail only after training, the
same masked-input request re-sent), and a server that learns a site's weight from whether it
answers (a weight budget bound in the session, binary-searched).

Each test names what stopped the attack in its last assertion's message.
"""

from __future__ import annotations

import pytest

from fedcore.config import resolve
from fedcore.secagg import SessionEncoding
from fedcore.secagg.messages import MaskedInput
from tests.federation.site_attack import AppSite, HandlerSite, Refused, Round, session

FOUR = (1, 2, 3, 4)  # the site under attack is node 1
R = b"R" * 16


def _through_masked_input(round_: Round) -> None:
    """Run the round's stages up to and including the masked-input stage."""
    while not round_.done and not any(
        type(r).__name__ == "MaskedInputRequest" for r in round_.sent
    ):
        round_.step()


def _dp_site(tmp_path, batched: bool = False) -> AppSite:
    settings = resolve(
        overrides=[
            "sites=4",
            "local_epochs=1",
            "secagg.enabled=true",
            "dp.site.epsilon=8",
            "dp.site.noise_multiplier=1.0",
            f"out={tmp_path}/run",
        ]
    )
    return AppSite(settings, tmp_path / "state", batched=batched)


# The same attacks on a site that a simulated node plays among others (issue 24).
ENGINES = pytest.mark.parametrize("batched", [False, True], ids=["own-node", "batched"])


def _site_epsilon(tmp_path) -> float:
    """What the site's DP-SGD ledger has spent (0.0 with no ledger: nothing was ever charged)."""
    from fedcore.privacy import PrivacyLedger

    ledgers = list((tmp_path / "state").rglob("*.ledger.json"))
    return sum(PrivacyLedger.load(path).epsilon() for path in ledgers)


@ENGINES
def test_the_ledger_probe_sees_a_charge(tmp_path, batched):
    """The probe above can fail: an honest round through the same ClientApp charges the ledger."""
    site = _dp_site(tmp_path, batched)
    round_ = Round(session(FOUR, round_id=R, length=site.dim() + 1), 1, site.ask, seed=1)
    _through_masked_input(round_)
    assert round_.refusals == [] and _site_epsilon(tmp_path) > 0


@ENGINES
@pytest.mark.parametrize("wrong", ["length", "weight budget"])
def test_a_session_that_cannot_be_answered_is_refused_before_training(
    tmp_path, counted_training, wrong, batched
):
    """Attack (point 3): a session whose vector length does not fit the model, or whose weight
    budget leaves no weight per site, used to make the site train and charge its DP ledger, then
    fail to encode; re-sent three times it charged three rounds and sent nothing."""
    site = _dp_site(tmp_path, batched)
    length = site.dim() + (5 if wrong == "length" else 1)
    budget = 2 if wrong == "weight budget" else 1 << 20  # 2 // 4 sites = 0 per site
    encoding = SessionEncoding(clip=4.0, max_total_weight=budget)
    for attempt in range(3):
        config = session(FOUR, round_id=bytes([attempt]) * 16, length=length, encoding=encoding)
        round_ = Round(config, 1, site.ask, seed=attempt)
        _through_masked_input(round_)
        assert round_.refusals and "refused before training" in round_.refusals[-1]
    assert counted_training == [], "stopped by _check_input, which runs before training"
    assert _site_epsilon(tmp_path) == 0.0, "nothing was charged"


def test_a_site_trains_at_most_once_per_round_id(tmp_path):
    """Attack (point 3): after a failure that follows training (here the trainer's update is not
    finite), the server re-sends the same masked-input request to make the site train again."""
    site = HandlerSite(tmp_path, value=float("nan"))
    round_ = Round(session(FOUR, round_id=R), 1, site.ask, seed=1)
    _through_masked_input(round_)
    assert site.trained == 1 and round_.refusals
    for _ in range(3):
        with pytest.raises(Refused, match="already trained for this round"):
            site.ask(round_.sent[-1])
    assert site.trained == 1, "stopped by the journal's 'trained' line, written before training"


@pytest.mark.parametrize("budget", [4 * 100, 4 * 4711, 4 * 4712, 4 * 100_000])
def test_whether_a_site_answers_does_not_depend_on_its_weight(tmp_path, budget):
    """Attack (point 4): binary search over the session's weight budget W used to find the site's
    weight (4711) exactly: the site answered iff its weight was at most W. Now it answers every
    budget (its weight capped to W // n), so the answers are the same for every W."""
    site = HandlerSite(tmp_path, weight=4711)
    encoding = SessionEncoding(clip=4.0, max_total_weight=budget)
    round_ = Round(session(FOUR, round_id=R, encoding=encoding), 1, site.ask, seed=1)
    _through_masked_input(round_)
    assert round_.refusals == [], "stopped by the cap: the site never refuses for its weight"
    assert isinstance(round_.answers[-1], MaskedInput)
    round_.run()
    assert round_.done


def _app_site(tmp_path, **extra) -> AppSite:
    settings = resolve(
        overrides=["sites=4", "local_epochs=1", "secagg.enabled=true", f"out={tmp_path}/run"]
    )
    return AppSite(settings, tmp_path / "state", extra=extra)


def _abandon_after_share_keys(site: AppSite, round_id: bytes, seed: int) -> Round:
    round_ = Round(session(FOUR, round_id=round_id, length=site.dim() + 1), 1, site.ask, seed=seed)
    for _ in range(2):  # advertise, share keys: the graph (the ring) is fixed; then walk away
        round_.step()
    return round_


def test_a_server_cannot_regrind_the_ring_beyond_the_abandoned_round_bound(tmp_path):
    """Attack (point 2): a colluding server runs the advertise and share stages, looks at the
    graph, and abandons the round whenever it does not place colluders around the target; about
    60 draws found a ring. The site now counts rounds abandoned after the reveal in its journal
    and, past its node config's bound, refuses to begin another in this run."""
    site = _app_site(tmp_path, **{"secagg-max-abandoned-per-run": 3})
    for i in range(3):
        first = _abandon_after_share_keys(site, bytes([i + 1]) * 16, seed=i)
        assert first.refusals == []
    ground = _abandon_after_share_keys(site, b"\x09" * 16, seed=9)
    assert ground.refusals and "secagg-max-abandoned-per-run" in ground.refusals[0], (
        "stopped by the journal's abandoned-round count"
    )
    site.restart()  # the bound is per run: a new run of the federation may begin again
    site.context.run_id = 2
    fresh = _abandon_after_share_keys(site, b"\x0a" * 16, seed=10)
    assert fresh.refusals == []


def test_a_bad_abandoned_round_bound_in_the_node_config_is_named(tmp_path):
    site = _app_site(tmp_path, **{"secagg-max-abandoned-per-day": 0})
    round_ = Round(session(FOUR, round_id=R, length=site.dim() + 1), 1, site.ask, seed=1)
    round_.step()
    assert "secagg-max-abandoned-per-day" in round_.refusals[0]
