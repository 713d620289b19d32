"""One bad site costs at most its own contribution, never the run (issue 10, point 6).

Each test plays a malicious site through the real path: the honest ClientApp answers, and the
site then tampers with its own reply on the wire (garbage sealed shares, a wrong Shamir share at
unmask, a masked input whose weight coordinate is shifted) before the server's round sees it.
"""

import json

import numpy as np
import pytest
from flwr.app import Message

from fedcore.config import resolve
from fedcore.crypto import CryptoRng
from fedcore.federation.server.serve import run_server
from fedcore.federation.site import secagg as secagg_site
from fedcore.secagg import encode
from fedcore.secagg.messages import (
    EncryptedShares,
    MaskedInput,
    ShareValue,
    UnmaskShares,
    decode_client_message,
)
from tests.federation.batched_sites import site_grid
from tests.federation.conftest import FakeGrid, honest

FIVE = (101, 102, 103, 104, 105)


def _stage(msg):
    record = msg.content.config_records.get(secagg_site.SECAGG)
    return None if record is None else record.get("stage")


def tampering(stage, change, *, rounds=None):
    """A site that answers honestly, then rewrites its reply to ``stage`` with ``change``
    (in the rounds numbered in ``rounds``, counted by the site; all rounds when None)."""
    seen = {"n": 0}

    def behave(msg, context):
        reply = honest(msg, context)
        if _stage(msg) != stage or reply.has_error():
            return reply
        seen["n"] += 1
        if rounds is not None and seen["n"] not in rounds:
            return reply
        record = reply.content.config_records[secagg_site.SECAGG]
        record["payload"] = encode(change(decode_client_message(record["payload"]), msg))
        return reply

    return behave


def _run(tmp_path, behaviours, *, rounds=2, extra=(), per_node=1, monkeypatch=None):
    out = tmp_path / "run"
    settings = resolve(
        overrides=[
            "sites=5",
            f"rounds={rounds}",
            "local_epochs=1",
            "secagg.timeout=5",
            "secagg.enabled=true",
            *extra,
            f"out={out}",
        ]
    )
    sites = {n: behaviours.get(n, honest) for n in FIVE}
    if per_node == 1:
        grid = FakeGrid(settings, sites)
    else:  # the batched engine (issue 24): the sites' node ids are 1..5, renamed back here
        grid = site_grid(settings, sites, per_node=per_node, monkeypatch=monkeypatch)
    run_server(grid, settings, out)
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return (
        rows
        if per_node == 1
        else [_renamed(row, dict(zip(grid.site_ids, FIVE, strict=True))) for row in rows]
    )


def _renamed(row: dict, names: dict[int, int]) -> dict:
    """``row`` with the batched engine's node ids as the one-node-per-site ids."""
    row["secagg"]["survivors"] = [names[n] for n in row["secagg"]["survivors"]]
    row["failures"] = {
        str(names.get(int(k), k)) if k.isdigit() else k: v for k, v in row["failures"].items()
    }
    return row


def garbage_shares(message: EncryptedShares, _msg: Message) -> EncryptedShares:
    rng = CryptoRng.from_seed(5, purpose="tests.garbage-shares")
    shares = tuple(
        type(s)(s.sender, s.receiver, rng.bytes(len(s.ciphertext))) for s in message.shares
    )
    return EncryptedShares(message.sender, message.round_id, shares)


@pytest.mark.parametrize("per_node", [1, 2], ids=["own-node", "batched"])
def test_a_site_sending_garbage_sealed_shares_is_left_out_and_the_round_completes(
    tmp_path, per_node, monkeypatch
):
    rows = _run(
        tmp_path,
        {103: tampering("share", garbage_shares)},
        per_node=per_node,
        monkeypatch=monkeypatch,
    )
    assert len(rows) == 2
    for row in rows:
        # every honest receiver treated 103 as dropped; the four others were aggregated
        assert row["secagg"]["survivors"] == [101, 102, 104, 105]
        assert row["sites_replied"] == 4 and "round" not in row["failures"]
        assert "did not open" in row["failures"]["103"]
        assert not {"101", "102", "104", "105"} & set(row["failures"])  # no honest site blamed
    assert rows[1]["eval_accuracy"] > rows[0]["eval_accuracy"] * 0.5


def test_same_in_a_sparse_graph_whose_ring_is_drawn_by_commit_reveal(tmp_path):
    rows = _run(
        tmp_path,
        {102: tampering("share", garbage_shares)},
        rounds=1,
        extra=("secagg.neighbors=2", "secagg.threshold=2"),
    )
    row = rows[0]
    assert set(row["secagg"]["stage_seconds"]) == {
        "advertise",
        "reveal",
        "share",
        "masked_input",
        "unmask",
    }
    assert 102 not in row["secagg"]["survivors"] and len(row["secagg"]["survivors"]) == 4
    assert "did not open" in row["failures"]["102"]


def wrong_share(message: UnmaskShares, _msg: Message) -> UnmaskShares:
    first = message.seed_shares[0]
    bad = ShareValue(first.owner, (first.value + 1) % (1 << 256))
    return UnmaskShares(
        message.sender, message.round_id, (bad, *message.seed_shares[1:]), message.key_shares
    )


def test_a_tampered_shamir_share_is_decoded_around_and_its_sender_named(tmp_path):
    # 101 has the lowest id, so its shares are among the t the server tries first (a wrong share
    # that is never used is never looked at, and harms nothing)
    rows = _run(tmp_path, {101: tampering("unmask", wrong_share)})
    for row in rows:
        assert row["secagg"]["survivors"] == list(FIVE)  # 101's input was fine: it stays in
        assert row["sites_replied"] == 5 and "round" not in row["failures"]
        assert "does not fit" in row["failures"]["101"]
        assert set(row["failures"]) == {"101"}


def shift_weight(delta):
    def change(message: MaskedInput, _msg: Message) -> MaskedInput:
        vec = message.vector.astype(np.uint64)
        vec[-1] = (int(vec[-1]) + delta) % (1 << message.bits)
        return MaskedInput(
            message.sender, message.round_id, message.bits, vec.astype(message.vector.dtype)
        )

    return change


def test_a_wrapped_weight_coordinate_discards_the_round_and_the_run_goes_on(tmp_path):
    rows = _run(tmp_path, {102: tampering("masked_input", shift_weight(1 << 31), rounds={1})})
    assert len(rows) == 2
    first, second = rows
    assert "decoded sum discarded" in first["failures"]["round"]
    assert "wrapped" in first["failures"]["round"]
    assert "round" not in second["failures"]  # the next round runs, and aggregates
    # (group testing may hold half the sites out of it, to find who spoiled round 1)
    assert set(second["secagg"]["survivors"]) <= set(FIVE) and second["num_examples"] > 0


def test_a_site_cancelling_the_others_weights_makes_the_round_implausible(tmp_path):
    honest_rows = _run(tmp_path / "honest", {}, rounds=1)
    total = honest_rows[0]["num_examples"]
    # Shift the total weight to 1: the decoded "mean" is then about W times too large.
    rows = _run(tmp_path, {105: tampering("masked_input", shift_weight(1 - total), rounds={1})})
    first, second = rows
    assert "clip range" in first["failures"]["round"]
    assert "decoded sum discarded" in first["failures"]["round"]
    assert "round" not in second["failures"] and 0 < second["num_examples"] <= total


def test_a_site_falsely_reporting_a_neighbour_spoils_at_most_that_round(tmp_path):
    """101 claims 105's share did not open although it masked with 105: 105 is left out, the pair
    mask stays in the sum, and the implausible sum is discarded; the next round aggregates."""

    def lie(message: MaskedInput, _msg: Message) -> MaskedInput:
        return MaskedInput(
            message.sender, message.round_id, message.bits, message.vector, unopened=(105,)
        )

    rows = _run(tmp_path, {101: tampering("masked_input", lie, rounds={1})})
    first, second = rows
    assert "decoded sum discarded" in first["failures"]["round"]
    assert "did not open at sites [101]" in first["failures"]["105"]
    assert "round" not in second["failures"] and set(second["secagg"]["survivors"]) <= set(FIVE)
