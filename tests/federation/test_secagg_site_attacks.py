"""A malicious server against the real site code path (the secure-aggregation handler and the
ClientApp, the site's key and round journal on disk, ``context.state`` thrown away at will).

Each test plays one attack and names, in its last assertion's message or its match, what stopped it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedcore.config import resolve
from fedcore.crypto.certs import issue_signing_certificate, make_ca
from fedcore.crypto.signing import verify_key_of
from fedcore.errors import ConfigError, CorruptJournalError
from fedcore.federation.site import registry as secagg_registry
from fedcore.federation.site.folders import SIMULATION_MARKER
from fedcore.federation.site.journal import RoundJournal
from fedcore.secagg import SessionEncoding
from fedcore.secagg.config import Mode
from fedcore.secagg.floors import Floors
from fedcore.secagg.messages import (
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    MaskedInputRequest,
    UnmaskRequest,
    UnmaskShares,
    decode_client_message,
)
from tests.federation.site_attack import AppSite, HandlerSite, Refused, Round, session

FOUR = (1, 2, 3, 4)  # the site under attack is node 1
R = b"R" * 16


def _through(round_: Round, stage: str) -> None:
    """Run ``round_`` until the site has answered ``stage``."""
    while not round_.done:
        round_.step()
        if round_.sent and type(round_.sent[-1]).__name__ == stage:
            return


def _journal(site: HandlerSite) -> dict:
    """Round id (hex) to its journal entry, for every round the journal names."""
    journal = RoundJournal(site.store)
    lines = site.store.journal_path.read_text().splitlines()[1:]
    rids = {json.loads(line)["round"] for line in lines}
    return {rid: journal.entry(bytes.fromhex(rid)) for rid in rids}


# ----------------------------------------------------------------------------- replays


def test_replaying_a_round_id_after_evicting_the_transcript_is_refused(tmp_path):
    site = HandlerSite(tmp_path)
    first = Round(session(FOUR, round_id=R), 1, site.ask, seed=1)
    _through(first, "MaskedInputRequest")
    assert site.trained == 1 and isinstance(first.answers[-1], MaskedInput)
    # Evict the transcript with another round, then run R again, this time asking for an encoding
    # that makes the update vanish (the difference of the two masked inputs would be the update).
    Round(session(FOUR, round_id=b"S" * 16), 1, site.ask, seed=2).step()
    zero = SessionEncoding(clip=1e-300, max_total_weight=1)
    again = Round(session(FOUR, round_id=R, encoding=zero), 1, site.ask, seed=3)
    again.run()
    assert site.trained == 1
    assert again.answers == []
    assert "replayed round id" in again.refusals[0], "stopped by the round journal"


def test_replaying_a_round_id_in_a_new_run_or_after_a_restart_is_refused(tmp_path):
    site = HandlerSite(tmp_path)
    first = Round(session(FOUR, round_id=R), 1, site.ask, seed=1)
    first.run()
    (unmask,) = [a for a in first.answers if isinstance(a, UnmaskShares)]
    assert {s.owner for s in unmask.seed_shares} == set(FOUR)  # everyone alive: seed shares only
    site.restart()  # a new run: Flower's context.state is fresh, the site's disk is not
    # The server asks the same session's unmask again, now calling peer 2 dropped (its mask-key
    # share would join the seed share it already holds): no transcript, no journal permission.
    with pytest.raises(Refused, match="no transcript of this round"):
        site.ask(UnmaskRequest(1, R, alive=(1, 3, 4), dropped=(2,)))
    again = Round(session(FOUR, round_id=R), 1, site.ask, seed=1)  # the very same server
    again.run()
    assert again.answers == [] and site.trained == 1
    assert "replayed round id" in again.refusals[0], "stopped by the round journal"


def test_a_reused_round_id_does_not_reproduce_the_rounds_secrets(tmp_path):
    """Even a site whose journal was (legitimately) started afresh with the same key draws new
    per-round secrets: the fresh nonce the journal keeps, not the server's round id, seeds them."""
    one, two = HandlerSite(tmp_path / "one"), HandlerSite(tmp_path / "two")
    Round(session(FOUR, round_id=b"X" * 16), 1, one.ask, seed=1).step()
    Round(session(FOUR, round_id=b"Y" * 16), 1, two.ask, seed=1).step()
    two.store.key_path.write_bytes(one.store.key_path.read_bytes())  # the same site key
    adverts = []
    for site in (one, two):
        round_ = Round(session(FOUR, round_id=R), 1, site.ask, seed=1)
        round_.step()
        (advert,) = round_.answers
        assert isinstance(advert, KeyAdvert)
        adverts.append(advert)
    assert adverts[0].enc_public != adverts[1].enc_public, "stopped by the per-round nonce"
    assert adverts[0].seed_commitment != adverts[1].seed_commitment


def test_a_second_unmask_request_is_refused_even_with_another_split(tmp_path):
    site = HandlerSite(tmp_path)
    round_ = Round(session(FOUR, round_id=R), 1, site.ask, seed=1)
    round_.run()
    before = site.store.journal_path.read_bytes()
    with pytest.raises(Refused, match="already answered an unmask"):
        site.ask(UnmaskRequest(1, R, alive=(1, 3, 4), dropped=(2,)))
    assert site.store.journal_path.read_bytes() == before, "stopped by the round journal"
    (entry,) = _journal(site).values()
    assert entry.unmasked and entry.key_shares_of == () and set(entry.seed_shares_of) == set(FOUR)


# ----------------------------------------------------------------------------- the journal itself


def test_a_key_without_its_journal_is_refused_not_recreated(tmp_path):
    site = HandlerSite(tmp_path)
    Round(session(FOUR, round_id=R), 1, site.ask, seed=1).run()
    site.store.journal_path.unlink()  # the history is lost (or deleted by someone)
    site.restart()
    with pytest.raises(Refused, match="CorruptJournalError: the round journal .* is missing"):
        site.ask(session_request(R))
    assert not site.store.journal_path.exists(), "stopped by the journal check at opening"


def test_a_damaged_journal_is_refused_and_left_as_it_is(tmp_path):
    site = HandlerSite(tmp_path)
    Round(session(FOUR, round_id=R), 1, site.ask, seed=1).step()
    site.store.journal_path.write_bytes(b'{"format": "fedcore.secagg.journal/1", "rounds": [')
    with pytest.raises(CorruptJournalError, match="damaged"):
        RoundJournal.open_site(site.store)
    with pytest.raises(Refused, match="CorruptJournalError"):
        site.ask(session_request(b"T" * 16))
    assert site.store.journal_path.read_bytes().endswith(b"[")


def test_a_torn_line_of_the_round_fails_closed_and_an_edit_is_refused(tmp_path):
    """Issue 21, point 7: a torn last line used to be cut, after which the site answered as if
    the event had never happened. A crash mid-write now fails closed for that round; an edited
    journal no longer matches its seal."""
    site = HandlerSite(tmp_path)
    round_ = Round(session(FOUR, round_id=R), 1, site.ask, seed=1)
    _through(round_, "ShareKeysRequest")
    path = site.store.journal_path
    path.write_bytes(path.read_bytes() + b'{"round":"' + R.hex().encode() + b'","mas')  # a crash
    _through(round_, "MaskedInputRequest")
    assert round_.refusals and "crash mid-write" in round_.refusals[-1]
    assert site.trained == 0, "stopped by the journal, which fails closed for the torn round"
    other = Round(session(FOUR, round_id=b"S" * 16), 1, site.ask, seed=2)
    _through(other, "MaskedInputRequest")  # a new round id still works
    assert other.refusals == [] and site.trained == 1
    path.write_bytes(path.read_bytes().replace(b'"masked":true', b'"masked":7'))
    with pytest.raises(Refused, match="CorruptJournalError"):
        site.ask(other.requests[1])


@pytest.mark.parametrize("plant", ["world-readable", "symlink"])
def test_a_key_file_that_is_not_private_is_refused(tmp_path, plant):
    site = HandlerSite(tmp_path)
    Round(session(FOUR, round_id=b"X" * 16), 1, site.ask, seed=1).step()
    key = site.store.key_path
    if plant == "world-readable":
        key.chmod(0o644)
    else:
        elsewhere = tmp_path / "planted.key"
        elsewhere.write_bytes(os.urandom(32))
        elsewhere.chmod(0o600)
        key.unlink()
        key.symlink_to(elsewhere)
    with pytest.raises(Refused, match="ConfigError: .*(mode 0644|symbolic link)"):
        site.ask(session_request(R))
    assert R.hex() not in _journal(site), "stopped by read_private before the round began"


# ----------------------------------------------------------------------------- weaker offers


def session_request(round_id, **kw):
    from fedcore.secagg.messages import AdvertiseRequest

    return AdvertiseRequest(1, session(kw.pop("clients", FOUR), round_id=round_id, **kw))


HUNDRED = tuple(range(1, 101))


@pytest.mark.parametrize(
    ("floors", "offer", "why"),
    [
        (Floors(), {"threshold": 2}, "below the safe 3 for 4 participants"),
        (Floors(), {"clients": HUNDRED, "threshold": 51 - 40}, "below the safe 51"),
        (Floors(), {"clients": HUNDRED, "neighbors": 2, "threshold": 2}, "degree 2 over 100"),
        (Floors(), {"mode": Mode.ACTIVE, "threshold": 3}, "below the safe 3"),
        (Floors(min_threshold=4), {"threshold": 3}, "'secagg-min-threshold'"),
        (Floors(min_neighbors=20), {"clients": HUNDRED, "neighbors": 16}, "'secagg-min-neighbors'"),
        (Floors(min_clients=5), {}, "'secagg-min-participants'"),
        (Floors(mode=Mode.ACTIVE), {}, "requires ACTIVE mode"),
    ],
)
def test_a_weaker_offer_is_refused_before_anything_is_recorded(tmp_path, floors, offer, why):
    site = HandlerSite(tmp_path, floors=floors)
    if offer.get("mode") is Mode.ACTIVE:  # 2n/3 in ACTIVE mode: 3 of 4 is fine, 2 is not
        offer = {**offer, "threshold": 2}
        why = "below the safe 3"
    with pytest.raises(Refused, match=f"refused: .*{why}"):
        site.ask(session_request(R, **offer))
    assert R.hex() not in _journal(site), "stopped by the site's floors"


def test_an_unsafe_offer_passes_only_when_the_floors_drop_the_safe_rules(tmp_path):
    site = HandlerSite(tmp_path, floors=Floors(safe_rules=False))
    advert = decode_client_message(site.ask(session_request(R, threshold=2)))
    assert isinstance(advert, KeyAdvert)


def test_a_session_without_a_bound_encoding_is_refused(tmp_path):
    site = HandlerSite(tmp_path)
    with pytest.raises(Refused, match="does not bind how sites encode"):
        site.ask(session_request(R, encoding=None))


# ----------------------------------------------------------------------------- certified registry


def _certified_federation(tmp_path, *, forge=None):
    """Site 1 (the real handler) and peers 2, 3, 4 in ACTIVE mode, every entry certified by one
    federation CA; ``forge(folder, ca, seeds)`` then tampers with the shared registry folder."""
    ca = make_ca()
    (tmp_path / "ca.crt").write_bytes(ca.certificate)
    site = HandlerSite(tmp_path / "site")
    folder = site.root / "registry"
    store = site.store
    key, _ = RoundJournal.open_site(store)
    public = verify_key_of(secagg_registry.signing_seed(key))
    store.certificate_path.write_bytes(
        issue_signing_certificate(ca, site="hospital-1", public_key=public)
    )
    site.identity = secagg_registry.SiteIdentity(tmp_path / "ca.crt", store.certificate_path)
    seeds = {c: bytes([c]) * 32 for c in (2, 3, 4)}
    folder.mkdir(parents=True)
    for c, seed in seeds.items():
        peer = verify_key_of(seed)
        (folder / f"{c}{secagg_registry.SUFFIX}").write_text(peer.hex())
        (folder / f"{c}{secagg_registry.CERT_SUFFIX}").write_bytes(
            issue_signing_certificate(ca, site=f"hospital-{c}", public_key=peer)
        )
    if forge is not None:
        forge(folder, seeds)
    registry = {c: verify_key_of(s) for c, s in seeds.items()} | {1: public}
    return site, seeds, registry


def _uncertified(folder, seeds):
    """Peer 3's entry was written by someone without the CA (the key file alone)."""
    (folder / f"3{secagg_registry.CERT_SUFFIX}").unlink()


def _other_ca(folder, seeds):
    """Peer 3's certificate comes from a CA of the attacker's own."""
    (folder / f"3{secagg_registry.CERT_SUFFIX}").write_bytes(
        issue_signing_certificate(make_ca(), site="hospital-3", public_key=verify_key_of(seeds[3]))
    )


def _sybil(folder, seeds):
    """Peer 3 copies its own certificate and key to node 4's entry: two nodes, one site."""
    for suffix in (secagg_registry.SUFFIX, secagg_registry.CERT_SUFFIX):
        (folder / f"4{suffix}").write_bytes((folder / f"3{suffix}").read_bytes())
    seeds[4] = seeds[3]


def test_a_round_of_certified_sites_completes(tmp_path):
    site, seeds, registry = _certified_federation(tmp_path)
    config = session(FOUR, round_id=R, mode=Mode.ACTIVE)
    round_ = Round(config, 1, site.ask, seed=1, signing=seeds, registry=registry)
    round_.run()
    assert round_.refusals == [] and isinstance(round_.answers[-1], UnmaskShares)


@pytest.mark.parametrize("forge", [_uncertified, _other_ca, _sybil])
def test_a_registry_entry_without_a_valid_certificate_is_not_a_peer(tmp_path, forge):
    site, seeds, registry = _certified_federation(tmp_path, forge=forge)
    registry[4] = verify_key_of(seeds[4])
    config = session(FOUR, round_id=R, mode=Mode.ACTIVE)
    round_ = Round(config, 1, site.ask, seed=1, signing=seeds, registry=registry)
    round_.run()
    assert site.trained == 0 and not any(isinstance(a, MaskedInput) for a in round_.answers)
    assert round_.refusals, "stopped by the certificate check of the registry entries"
    accepted = secagg_registry.load_registry(
        site.root / "registry", ca=(tmp_path / "ca.crt").read_bytes()
    )
    assert 3 not in accepted and 2 in accepted


@pytest.mark.parametrize("pinned", [None, {"hospital-1", "hospital-2", "hospital-3", "hospital-4"}])
def test_control_a_round_passes_the_pinned_names(tmp_path, pinned):
    site, seeds, registry = _certified_federation(tmp_path)
    site.identity = dataclasses.replace(
        site.identity, expected=None if pinned is None else frozenset(pinned)
    )
    round_ = Round(
        session(FOUR, round_id=R, mode=Mode.ACTIVE),
        1,
        site.ask,
        seed=1,
        signing=seeds,
        registry=registry,
    )
    round_.run()
    assert round_.refusals == [] and isinstance(round_.answers[-1], UnmaskShares)


def test_a_name_the_ca_minted_outside_the_sites_pinned_list_is_not_a_peer(tmp_path):
    """The aggregator's operator holds the CA (issue 21, point 9) and certifies a Sybil under a
    new name, hospital-4: a site that pinned its expected peers (node config
    ``secagg-expected-sites``) does not count it, and refuses the round before training."""
    site, seeds, registry = _certified_federation(tmp_path)
    pinned = secagg_registry.expected_sites(
        {secagg_registry.EXPECTED_SITES: "hospital-1, hospital-2,hospital-3"}
    )
    site.identity = dataclasses.replace(site.identity, expected=pinned)
    round_ = Round(
        session(FOUR, round_id=R, mode=Mode.ACTIVE),
        1,
        site.ask,
        seed=1,
        signing=seeds,
        registry=registry,
    )
    round_.run()
    assert site.trained == 0 and not any(isinstance(a, MaskedInput) for a in round_.answers)
    assert round_.refusals, "stopped by the pinned list of site names"
    accepted = secagg_registry.load_registry(
        site.root / "registry", ca=(tmp_path / "ca.crt").read_bytes(), expected=pinned
    )
    assert set(accepted) == {1, 2, 3}  # its own entry (published at enrolment) and two peers


def test_an_empty_pinned_list_is_a_config_error():
    with pytest.raises(ConfigError, match="secagg-expected-sites"):
        secagg_registry.expected_sites({secagg_registry.EXPECTED_SITES: " , "})


def test_a_site_without_a_certificate_refuses_and_tells_its_key(tmp_path):
    site, _, _ = _certified_federation(tmp_path)
    site.store.certificate_path.unlink()
    with pytest.raises(Refused, match="--signing-key [0-9a-f]{64}"):
        site.ask(session_request(R, mode=Mode.ACTIVE, threshold=3))


# ----------------------------------------------------------------------------- validate, then work


def test_junk_masked_input_requests_do_not_train(tmp_path):
    site = HandlerSite(tmp_path)
    with pytest.raises(Refused, match="journal has no such round id|no transcript"):
        site.ask(MaskedInputRequest(1, b"J" * 16, ()))
    round_ = Round(session(FOUR, round_id=R), 1, site.ask, seed=1)
    _through(round_, "ShareKeysRequest")
    (request,) = [r for c, r in round_.requests.items() if c == 1]
    share = request.shares[0]
    tampered = MaskedInputRequest(
        1, R, (EncryptedShare(share.sender, share.receiver, bytes(len(share.ciphertext))),)
    )
    with pytest.raises(Refused):
        site.ask(tampered)
    assert site.trained == 0, "stopped by the client's checks, which run before training"
    assert not _journal(site)[R.hex()].masked


def test_a_second_masked_input_for_a_round_is_refused_without_training(tmp_path):
    site = HandlerSite(tmp_path)
    round_ = Round(session(FOUR, round_id=R), 1, site.ask, seed=1)
    _through(round_, "MaskedInputRequest")
    with pytest.raises(Refused, match="already sent its masked input"):
        site.ask(round_.sent[-1])
    assert site.trained == 1, "stopped by the round journal before training"


def test_error_text_that_leaves_the_site_carries_no_weight(tmp_path, caplog):
    site = HandlerSite(tmp_path, weight=123457, value=float("nan"))  # a training that diverged
    round_ = Round(session(FOUR, round_id=R), 1, site.ask, seed=1)
    _through(round_, "MaskedInputRequest")
    (reason,) = round_.refusals
    assert "does not fit the session's encoding" in reason
    assert "123457" not in reason, "stopped by the generic reason (detail only in the site's log)"
    assert "123457" in caplog.text


# ----------------------------------------------------------------------------- the ClientApp


def _app_site(tmp_path, *overrides, batched=False, **extra):
    settings = resolve(
        overrides=[
            "sites=4",
            "local_epochs=1",
            "secagg.enabled=true",
            f"out={tmp_path}/run",
            *overrides,
        ]
    )
    return AppSite(settings, tmp_path / "state", extra=extra, batched=batched)


# The same attacks on a site that a simulated node plays among others (issue 24), where the
# node has no operator node config: those that need one stay deployed-only.
ENGINES = pytest.mark.parametrize("batched", [False, True], ids=["own-node", "batched"])


@ENGINES
def test_the_clientapp_refuses_a_replayed_round_without_training(
    tmp_path, counted_training, batched
):
    site = _app_site(tmp_path, batched=batched)
    config = session(FOUR, round_id=R, length=site.dim() + 1)
    first = Round(config, 1, site.ask, seed=1)
    first.run()
    assert any(isinstance(a, UnmaskShares) for a in first.answers) and len(counted_training) == 1
    site.restart()  # a new run on the same SuperNode
    again = Round(config, 1, site.ask, seed=1)
    again.run()
    assert again.answers == [] and len(counted_training) == 1
    assert "replayed round id" in again.refusals[0], "stopped by the round journal"


@ENGINES
def test_a_junk_masked_input_request_neither_trains_nor_charges_the_ledger(
    tmp_path, counted_training, batched
):
    site = _app_site(tmp_path, "dp.site.epsilon=8", "dp.site.noise_multiplier=1.0", batched=batched)
    with pytest.raises(Refused, match="journal has no such round id|no transcript"):
        site.ask(MaskedInputRequest(1, b"J" * 16, ()))
    assert counted_training == []
    assert not list((tmp_path / "state").rglob("*.ledger.json")), "checked before any charge"


def test_the_clientapp_refuses_a_downgrade_its_node_config_forbids(tmp_path, counted_training):
    site = _app_site(tmp_path, **{"secagg-mode": "active"})
    with pytest.raises(Refused, match="requires ACTIVE mode .*'secagg-mode'"):
        site.ask(session_request(R, length=site.dim() + 1))
    assert counted_training == [], "stopped by the node config's floor"


def test_the_run_config_cannot_lower_a_deployed_sites_floors(tmp_path):
    """``secagg.allow_unsafe`` comes from the server: a deployed site ignores it."""
    site = _app_site(tmp_path, "secagg.allow_unsafe=true")
    with pytest.raises(Refused, match="below the safe 3"):
        site.ask(session_request(R, threshold=2, length=site.dim() + 1))


def test_a_deployed_site_without_state_dir_refuses(tmp_path, monkeypatch):
    monkeypatch.delenv(SIMULATION_MARKER)
    site = _app_site(tmp_path)
    site.context.node_config.pop("state-dir")
    with pytest.raises(Refused, match="'state-dir'"):
        site.ask(session_request(R, length=site.dim() + 1))
    assert not list(Path(tmp_path / "run").rglob("*.secagg.key")), "no fallback to the run's out"


# ----------------------------------------------------------------------------- property


STEP = st.tuples(st.just("step"), st.sampled_from([R, b"S" * 16]))
ACTIONS = st.lists(
    st.one_of(
        STEP,
        STEP,
        STEP,
        st.tuples(st.just("fork"), st.sampled_from([R, b"S" * 16])),
        st.tuples(st.just("replay"), st.sampled_from([R, b"S" * 16]), st.integers(0, 6)),
        st.tuples(st.just("split"), st.sampled_from([R, b"S" * 16]), st.integers(0, 7)),
        st.tuples(st.just("restart")),
    ),
    max_size=24,
)


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(actions=ACTIONS)
@example(  # the attack of the issue: evict, then run the round id again, then unmask either way
    actions=[("step", R)] * 3
    + [("step", b"S" * 16), ("fork", R)]
    + [("step", R)] * 3
    + [("split", R, 1), ("restart",), ("split", R, 6)]
)
def test_a_site_never_releases_both_shares_of_a_peer(actions):
    """Random replays, forks of a round id, restarts and request orders: per round id the site
    sends at most one masked input and one unmask answer, and never both shares of one peer."""
    root = Path(tempfile.mkdtemp())
    try:
        site = HandlerSite(root)
        rounds: dict[bytes, Round] = {}
        answers: list[object] = []
        forks = 0
        for action in actions:
            kind, rid = action[0], action[1] if len(action) > 1 else None
            if kind == "restart":
                site.restart()
                continue
            if kind == "fork" or rid not in rounds:
                forks += 1
                rounds[rid] = Round(session(FOUR, round_id=rid), 1, site.ask, seed=forks)
            round_ = rounds[rid]
            if kind in ("step", "fork"):
                before = len(round_.answers)
                round_.step()
                answers += round_.answers[before:]
                continue
            if kind == "replay" and round_.sent:
                request = round_.sent[action[2] % len(round_.sent)]
            elif kind == "split":
                dropped = tuple(c for i, c in enumerate(FOUR[1:]) if action[2] >> i & 1)
                alive = tuple(c for c in FOUR if c not in dropped)
                request = UnmaskRequest(1, rid, alive=alive, dropped=dropped)
            else:
                continue
            try:
                answers.append(decode_client_message(site.ask(request)))
            except Refused:
                pass
        for rid in (R, b"S" * 16):
            unmasks = [a for a in answers if isinstance(a, UnmaskShares) and a.round_id == rid]
            masked = [a for a in answers if isinstance(a, MaskedInput) and a.round_id == rid]
            assert len(unmasks) <= 1 and len(masked) <= 1
            seeds = {s.owner for a in unmasks for s in a.seed_shares}
            keys = {s.owner for a in unmasks for s in a.key_shares}
            assert not seeds & keys
    finally:
        shutil.rmtree(root)


def test_the_property_reaches_the_unmask_stage():
    """The property above is not vacuous: an honest sequence does reach an unmask answer."""
    root = Path(tempfile.mkdtemp())
    try:
        site = HandlerSite(root)
        round_ = Round(session(FOUR, round_id=R), 1, site.ask, seed=1)
        round_.run()
        assert isinstance(round_.answers[-1], UnmaskShares)
        assert np.all([not r for r in round_.refusals])
    finally:
        shutil.rmtree(root)


def test_config_error_for_bad_node_config_floors():
    from fedcore.federation.site.secagg import site_floors

    with pytest.raises(ConfigError, match="'secagg-mode'"):
        site_floors({"secagg-mode": "paranoid"})
    with pytest.raises(ConfigError, match="'secagg-min-threshold'"):
        site_floors({"secagg-min-threshold": 1})
    assert site_floors({"secagg-mode": "active", "secagg-min-neighbors": "8"}) == Floors(
        mode=Mode.ACTIVE, min_neighbors=8
    )
