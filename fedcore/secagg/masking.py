"""The masked input of one client (Bonawitz et al., CCS 2017, figure 4, round 2):

    y_u = x_u + PRG(b_u) + sum_{v in V, u < v} PRG(s_uv) - sum_{v in V, u > v} PRG(s_uv)  (mod 2**bits)

where V is the set of neighbours whose sealed share opened at u. The server removes the masks with
:func:`fedcore.secagg.recovery.remove_masks`. Every mask is a keystream of a cryptographic
generator (:mod:`fedcore.crypto.expand`), never ``numpy.random``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedcore.crypto.agreement import AgreementKey
from fedcore.crypto.expand import add_keystreams
from fedcore.secagg.config import ring_dtype
from fedcore.secagg.messages import KeyAdvert
from fedcore.secagg.session import pairwise_seed, self_mask_key


def mask_input(
    y: np.ndarray,
    *,
    me: int,
    bits: int,
    seed: bytes,
    mask_key: AgreementKey,
    peers: Iterable[int],
    adverts: Mapping[int, KeyAdvert],
    sid: bytes,
) -> np.ndarray:
    """Mask the ring vector ``y`` in place (one pass for all the masks), read-only, and return it.

    ``seed``: b_u; ``mask_key``: s_u; ``peers``: V, the neighbours u masks with."""
    adds: list[bytes] = [self_mask_key(seed, sid)]
    subtracts: list[bytes] = []
    for v in sorted(peers):
        s = pairwise_seed(mask_key, adverts[v].mask_public, sid, me, v)
        (subtracts if me > v else adds).append(s)
    add_keystreams(y, adds=adds, subtracts=subtracts)
    if bits not in (32, 64):
        y &= ring_dtype(bits)((1 << bits) - 1)
    y.flags.writeable = False
    return y
