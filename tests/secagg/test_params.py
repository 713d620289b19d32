"""(k, t) for SecAgg+ against the vectors Google's FCP publishes for its parameter finder.

Source: google-parfait/federated-compute, fcp/secagg/server/graph_parameter_finder_test.cc
(HararyGraphParameterFinderTest_Feasible): the degree must match exactly and the threshold must
not exceed the published one.
"""

from __future__ import annotations

import pytest

from fedcore.errors import ConfigError
from fedcore.secagg import AdversaryClass, SessionConfig, harary_parameters
from fedcore.secagg.config import MAX_CLIENTS

SH, SM, NONE = AdversaryClass.SEMI_HONEST, AdversaryClass.SEMI_MALICIOUS, AdversaryClass.NONE

FCP_VECTORS = [
    # n, corrupt, dropout, adversary, k, t_max
    (100, 0.05, 0.05, SH, 12, 6),  # quoted in issue 3
    (1000, 0.05, 0.05, SH, 30, 17),  # quoted in issue 3
    (10, 0.05, 0.05, SH, 2, 2),
    (10000, 0.05, 0.05, SH, 34, 20),
    (100000, 0.05, 0.05, SH, 36, 21),
    (100, 0.45, 0.45, SH, 92, 46),
    (1000, 0.33, 0.33, SH, 286, 150),
    (10, 0.33, 0.33, SH, 8, 4),
    (100, 0.05, 0.33, SH, 28, 6),
    (1000, 0.05, 0.33, SH, 72, 24),
    (100, 0.33, 0.05, SH, 34, 29),
    (100, 0.33, 0.0, SH, 26, 25),
    (100, 0.0, 0.33, SH, 26, 2),
    (100, 0.0, 0.33, NONE, 26, 2),
    (1000, 0.0, 0.0, SH, 2, 2),
    (100, 0.05, 0.05, SM, 16, 11),
    (1000, 0.05, 0.05, SM, 52, 37),
    (100, 0.3, 0.3, SM, 92, 62),
    (1000, 0.05, 0.33, SM, 398, 223),
    (1000, 0.33, 0.05, SM, 132, 109),
    (100, 0.0, 0.33, SM, 68, 35),
]


@pytest.mark.parametrize(("n", "corrupt", "dropout", "adversary", "k", "t_max"), FCP_VECTORS)
def test_matches_fcp_vectors(
    n: int, corrupt: float, dropout: float, adversary: AdversaryClass, k: int, t_max: int
) -> None:
    p = harary_parameters(
        n, corrupt_fraction=corrupt, dropout_fraction=dropout, adversary=adversary
    )
    assert p.neighbors == k
    assert 2 <= p.threshold <= t_max
    assert p.threshold <= p.neighbors + 1
    # the result is directly usable as a session config (up to the session size limit)
    if n > MAX_CLIENTS:
        return
    SessionConfig(
        round_id=b"r",
        clients=tuple(range(n)),
        threshold=p.threshold,
        length=1,
        neighbors=p.neighbors,
    )


@pytest.mark.parametrize(
    ("n", "corrupt", "dropout", "adversary"),
    [
        (0, 0.1, 0.1, SH),
        (1000, 0.1, 1.0, SH),
        (1000, 0.1, -1.0, SH),
        (1000, 0.5, 0.5, SH),
        (1000, 0.5, 0.5, SM),
        (1000, 0.33, 0.33, SM),
        (1000, 0.1, 0.1, NONE),
    ],
)
def test_refuses_invalid_or_infeasible_requirements(
    n: int, corrupt: float, dropout: float, adversary: AdversaryClass
) -> None:
    with pytest.raises(ConfigError):
        harary_parameters(
            n, corrupt_fraction=corrupt, dropout_fraction=dropout, adversary=adversary
        )


def test_small_n_with_large_fractions_has_no_sparse_graph() -> None:
    with pytest.raises(ConfigError):
        harary_parameters(5, corrupt_fraction=0.4, dropout_fraction=0.4)
