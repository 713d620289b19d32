"""How long a secure-aggregation stage waits, in simulation and out (issue 24).

``secagg.timeout`` is the time *one site* has to answer one protocol stage. Deployed, the sites
answer in parallel, so it is the stage's deadline. In fedcore's simulation a worker answers its
sites one after another (a node plays its sites in turn, and past the workers the nodes queue), so
a stage of sites that each answer within ``secagg.timeout`` can take that many times longer; the
stage waits ``secagg.timeout x`` the most sites one worker answers in turn
(:func:`stage_deadline`). So a federation whose every site would meet its timeout is never failed
by the simulator's own queueing: the deadline grows with the work the stage queues on a worker
(its sites, each doing work in proportion to the vector length).

A round that can only time out is refused before it starts (:func:`check_stage_timeouts`, a
:class:`~fedcore.errors.ConfigError` naming ``secagg.timeout``): at the masked-input stage a site
expands ``k + 1`` keystreams as long as the vector (its self mask and one per neighbour; Bonawitz
et al., CCS 2017, figure 4, round 2), and no one-core cryptographic generator expands faster than
:data:`KEYSTREAM_FLOOR_BYTES_PER_SECOND` (AES-CTR with AES-NI, the fastest, reaches about 5 GB/s;
fedcore's keystream measured 1-3 GB/s here, ``benchmarks/secagg_core.py``); at the share stage it
agrees a key with each neighbour, no faster than :data:`AGREEMENT_FLOOR_SECONDS` each (X25519 takes
about 50 microseconds). A per-site timeout below that floor cannot be met by any site.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedcore.errors import ConfigError
from fedcore.secagg.config import Stage, ring_dtype

KEYSTREAM_FLOOR_BYTES_PER_SECOND = 16e9  # faster than any one-core CSPRNG
AGREEMENT_FLOOR_SECONDS = 10e-6  # less than one X25519 key agreement


def sites_in_sequence(grid: Any, destinations: Sequence[int]) -> int:
    """The most sites one worker answers in turn when ``destinations`` are sent over ``grid``:
    what fedcore's simulation Grid says (:mod:`fedcore.federation.simulation.batched`), 1 for any
    other Grid (deployed sites answer in parallel)."""
    count = getattr(grid, "sites_in_sequence", None)
    return 1 if count is None else max(1, int(count(destinations)))


def stage_deadline(timeout: float, grid: Any, destinations: Sequence[int]) -> float:
    """Seconds a stage sent to ``destinations`` waits: ``timeout`` per site answered in turn."""
    return timeout * sites_in_sequence(grid, destinations)


def site_work_floor(stage: Stage, *, length: int, peers: int, bits: int) -> float:
    """Seconds one site spends on ``stage`` at the very least (see the module's docstring):
    ``(peers + 1) x length`` ring words of keystream at the masked input, ``peers`` key
    agreements at the share stage, 0 for the others."""
    if stage is Stage.MASKED_INPUT:
        word = np.dtype(ring_dtype(bits)).itemsize
        return (peers + 1) * length * word / KEYSTREAM_FLOOR_BYTES_PER_SECOND
    if stage is Stage.SHARE:
        return peers * AGREEMENT_FLOOR_SECONDS
    return 0.0


def check_stage_timeouts(timeout: float, *, length: int, peers: int, bits: int) -> None:
    """Refuse (:class:`ConfigError`) a round in which some stage can only time out: a per-site
    ``secagg.timeout`` below the least work a site has at that stage, with ``peers`` neighbours
    and a vector of ``length`` ring elements of ``bits`` bits."""
    for stage in Stage:
        floor = site_work_floor(stage, length=length, peers=peers, bits=bits)
        if floor > timeout:
            raise ConfigError(
                f"secagg.timeout={timeout:g} s cannot be met: at the {stage.value} stage every "
                f"site needs at least {floor:.3g} s ({peers} neighbours, a vector of {length} "
                f"{bits}-bit values); set secagg.timeout above {floor:.3g}"
            )
