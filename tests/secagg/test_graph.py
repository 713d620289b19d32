"""The neighbour graph: k-regular, symmetric, fixed by the session id, complete when k >= n - 1."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.secagg.graph import NeighborGraph


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    ids=st.lists(st.integers(0, 2**64 - 2), min_size=3, max_size=40, unique=True),
    half=st.integers(1, 8),
    sid=st.binary(min_size=1, max_size=32),
)
def test_harary_graph_is_k_regular_and_symmetric(ids: list[int], half: int, sid: bytes) -> None:
    k = 2 * half
    g = NeighborGraph(ids, neighbors=k, seed=sid)
    assert sorted(g.ring) == sorted(ids)
    for u in ids:
        nu = g.neighbors(u)
        assert u not in nu
        assert g.holders(u) == nu | {u}
        assert len(nu) == (len(ids) - 1 if k >= len(ids) - 1 else k)
        for v in nu:
            assert u in g.neighbors(v)


def test_ring_depends_on_the_session_id_only() -> None:
    ids = list(range(50))
    a = NeighborGraph(ids, neighbors=4, seed=b"one")
    b = NeighborGraph(reversed(ids), neighbors=4, seed=b"one")
    c = NeighborGraph(ids, neighbors=4, seed=b"two")
    assert a.ring == b.ring
    assert a.ring != c.ring
    assert a.ring != tuple(ids)  # permuted (probability 1/50! of a false failure)


def test_positions_are_spread_over_the_ring() -> None:
    """Each id lands on each half of the ring about equally often over many sessions."""
    ids = list(range(10))
    first_half = [0] * 10
    for s in range(400):
        ring = NeighborGraph(ids, neighbors=2, seed=s.to_bytes(4, "big")).ring
        for c in ring[:5]:
            first_half[c] += 1
    # Binomial(400, 1/2): sd 10, so 200 +- 60 is a 6 sd band.
    assert all(140 <= x <= 260 for x in first_half), first_half


def test_complete_graph() -> None:
    g = NeighborGraph([5, 1, 9], neighbors=0, seed=b"x")
    assert g.complete and g.neighbors(1) == {5, 9}
    assert NeighborGraph(range(5), neighbors=4, seed=b"x").complete
