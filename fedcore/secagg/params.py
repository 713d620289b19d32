"""Choosing SecAgg+'s degree k and threshold t from n and the corrupt and dropout fractions.

Theory of operation (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020, section 4.2, as implemented in Google's Federated Compute Platform,
``fcp/secagg/server/graph_parameter_finder.cc``). With clients on a randomly permuted ring and each
joined to its k/2 nearest on either side, the protocol is secure with probability at least
1 - 2**-40 and completes with probability at least 1 - 2**-20 when:

1. the graph minus the corrupt and dropped clients stays connected. Disconnecting a Harary graph
   needs two runs of k/2 consecutive bad clients; a union bound over the n(n - k - 1)/2 pairs of
   runs bounds the probability by
   n(n-k-1)/2 * B! (n-k)! / (n! (B-k)!), with B = floor(n*corrupt) + floor(n*dropout);
2. no client has t or more corrupt neighbours (then the server with them could rebuild its
   secrets): t > t1, the (1 - 2**-41/n) quantile of the hypergeometric number of corrupt clients
   among k drawn from n;
3. every client keeps at least t surviving neighbours: t <= t2, the 2**-20/n quantile of the
   hypergeometric number of survivors among its k neighbours.

The search takes the least even k for which (t1, t2] is not empty and returns t = max(t1 + 1, 2).
Against a semi-malicious server t must also exceed (t1 + k)/2 (FCP's adjustment). Each security
event gets 2**-41 so the two together stay below 2**-40. FCP publishes its outputs as test
vectors (``graph_parameter_finder_test.cc``): for n = 100 with 5% corrupt and 5% dropout in the
semi-honest model, k = 12 and t <= 6; for n = 1000, k = 30 and t <= 17.

Here k counts the neighbours *other than* the client itself; each secret has k + 1 holders.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from fedcore.errors import ConfigError

SECURITY_BITS = 40
CORRECTNESS_BITS = 20
MAX_CLIENTS = 1_000_000
_SMALL = 1e-14  # keeps float rounding from tipping floor/ceil the insecure way (as FCP does)


class AdversaryClass(enum.Enum):
    """The server's behaviour the parameters must withstand."""

    NONE = "none"  # no corrupt clients at all; only dropouts
    SEMI_HONEST = "semi_honest"  # FCP's CURIOUS_SERVER
    SEMI_MALICIOUS = "semi_malicious"  # FCP's SEMI_MALICIOUS_SERVER


@dataclass(frozen=True, slots=True)
class GraphParameters:
    """A Harary-graph degree (neighbours per client, itself excluded) and a Shamir threshold."""

    clients: int
    neighbors: int
    threshold: int


def harary_parameters(
    clients: int,
    *,
    corrupt_fraction: float,
    dropout_fraction: float,
    adversary: AdversaryClass = AdversaryClass.SEMI_HONEST,
) -> GraphParameters:
    """The least even degree k, and a threshold t, meeting 40 bits of security, 20 of correctness.

    Raises ConfigError for out-of-range inputs or when no k < n - 1 works (small n with large
    fractions: use the complete graph then).
    """
    _check(clients, corrupt_fraction, dropout_fraction, adversary)
    for k in range(2, clients - 1, 2):
        t = _threshold_for(clients, k, corrupt_fraction, dropout_fraction, adversary)
        if t is not None:
            return GraphParameters(clients, k, t)
    raise ConfigError(
        f"no Harary graph over {clients} clients meets the requirements for corrupt fraction "
        f"{corrupt_fraction} and dropout fraction {dropout_fraction}; use the complete graph"
    )


def _check(n: int, corrupt: float, dropout: float, adversary: AdversaryClass) -> None:
    if not 1 <= n <= MAX_CLIENTS:
        raise ConfigError(f"clients must be in 1..{MAX_CLIENTS}, got {n}")
    if not 0 <= corrupt < 1:
        raise ConfigError(f"corrupt_fraction must be in [0, 1), got {corrupt}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"dropout_fraction must be in [0, 1), got {dropout}")
    if adversary is AdversaryClass.NONE and corrupt > 0:
        raise ConfigError(f"with no adversary corrupt_fraction must be 0, got {corrupt}")
    if adversary is not AdversaryClass.SEMI_MALICIOUS and corrupt + dropout > 0.9:
        raise ConfigError(
            f"corrupt_fraction + dropout_fraction must be <= 0.9, got {corrupt} + {dropout}"
        )
    if adversary is AdversaryClass.SEMI_MALICIOUS and corrupt + 2 * dropout > 0.9:
        raise ConfigError(
            f"corrupt_fraction + 2 * dropout_fraction must be <= 0.9 against a semi-malicious "
            f"server, got {corrupt} + 2 * {dropout}"
        )


def _log_prob_disconnected(n: int, k: int, corrupt: float, dropout: float) -> float:
    """Union bound (condition 1 of the module docstring), as a natural logarithm."""
    bad = math.floor((corrupt + _SMALL) * n) + math.floor((dropout + _SMALL) * n)
    if k > bad:
        return -math.inf
    log_pairs = math.log(n) + math.log(n - k - 1) - math.log(2)
    return (
        log_pairs
        + math.lgamma(bad + 1)
        + math.lgamma(n - k + 1)
        - math.lgamma(n + 1)
        - math.lgamma(bad - k + 1)
    )


def _threshold_for(
    n: int, k: int, corrupt: float, dropout: float, adversary: AdversaryClass
) -> int | None:
    per_event_bits = SECURITY_BITS + 1  # the security budget is split over two bad events
    if _log_prob_disconnected(n, k, corrupt, dropout) >= -per_event_bits * math.log(2):
        return None
    corrupt_max = math.floor((corrupt + _SMALL) * n)
    survivors_min = math.ceil((1 - dropout - _SMALL) * n)
    corrupt_neighbors = _Hypergeometric(n, corrupt_max, k)
    surviving_neighbors = _Hypergeometric(n, survivors_min, k)
    t1 = corrupt_neighbors.quantile(2.0**-per_event_bits / n, upper=True)
    tail = 2.0**-CORRECTNESS_BITS / n
    t2 = surviving_neighbors.quantile(tail)
    if surviving_neighbors.cdf(t2) < tail:
        t2 += 1
    if adversary is AdversaryClass.SEMI_MALICIOUS:
        t1 = math.ceil((t1 + k - 1.25) / 2)
    if t2 <= t1:
        return None
    return max(t1 + 1, 2)


class _Hypergeometric:
    """X = number of marked items among ``sampled`` drawn without replacement from ``total``."""

    __slots__ = ("total", "marked", "sampled")

    def __init__(self, total: int, marked: int, sampled: int) -> None:
        self.total, self.marked, self.sampled = total, marked, sampled

    def _pmf(self, x: float, counted: int) -> float:
        n, s = self.total, self.sampled
        if x < 0 or x > s or x > counted or n + x < counted + s:
            return 0.0
        log_pmf = (
            math.lgamma(s + 1)
            + math.lgamma(counted + 1)
            + math.lgamma(n - counted + 1)
            + math.lgamma(n - s + 1)
            - math.lgamma(x + 1)
            - math.lgamma(s - x + 1)
            - math.lgamma(counted - x + 1)
            - math.lgamma(n + 1)
            - math.lgamma(n - s - counted + x + 1)
        )
        return math.exp(log_pmf)

    def _cdf(self, x: float, counted: int) -> float:
        """P(X <= x) for ``counted`` marked items, summing the pmf downwards until negligible."""
        n, s = self.total, self.sampled
        pmf, total = self._pmf(x, counted), 0.0
        while pmf > total * 1e-16:
            total += pmf
            pmf *= x * (n - counted - s + x) / ((counted - x + 1) * (s - x + 1))
            x -= 1
        return total

    def cdf(self, x: float) -> float:
        x = math.floor(x)
        if x > self.marked * self.sampled / self.total:  # upper half: use the complement
            return 1 - self._cdf(self.sampled - x - 1, self.total - self.marked)
        return self._cdf(x, self.marked)

    def quantile(self, q: float, *, upper: bool = False) -> int:
        """The least x with P(X <= x) >= q, minus one; with ``upper``, the same for P(X > x) <= q.

        Rounded away from the median, as FCP's ``FindQuantile``.
        """
        if q > 0.5:
            q, upper = 1 - q, not upper
        if upper:
            return self.sampled - self._quantile(q, self.total - self.marked) - 1
        return self._quantile(q, self.marked)

    def _quantile(self, q: float, counted: int) -> int:
        n, s = self.total, self.sampled
        # Start from a lower bound (Hoeffding's inequality inverted) and walk up the pmf.
        start = max(
            -1.0, counted + s - n - 1.0, s * (counted / n - math.sqrt(-math.log(q) / (2 * s)))
        )
        x = math.floor(start)
        cdf, pmf = self._cdf(x, counted), self._pmf(x, counted)
        while cdf < q and x < s:
            if pmf > 0:
                pmf *= (counted - x) * (s - x) / ((x + 1) * (n - counted - s + x + 1))
            else:
                pmf = self._pmf(x + 1, counted)
            cdf += pmf
            x += 1
        return x - 1


def threshold_floor(
    clients: int,
    neighbors: int,
    *,
    corrupt_fraction: float,
    dropout_fraction: float,
    adversary: AdversaryClass = AdversaryClass.SEMI_HONEST,
) -> int | None:
    """The least threshold t that the finder accepts for a Harary graph of even degree
    ``neighbors`` over ``clients``; None when that degree fails the security or correctness
    condition at any t (too few neighbours for this many clients). Raises ConfigError for
    out-of-range inputs."""
    _check(clients, corrupt_fraction, dropout_fraction, adversary)
    if neighbors < 2 or neighbors % 2 or neighbors >= clients - 1:
        raise ConfigError(f"neighbors must be an even k in 2..{clients - 2}, got {neighbors}")
    return _threshold_for(clients, neighbors, corrupt_fraction, dropout_fraction, adversary)
