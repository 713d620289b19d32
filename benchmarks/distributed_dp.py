"""A site's added cost under distributed DP at d = 2**20: rotation, rounding, noise.

    .venv/bin/python benchmarks/distributed_dp.py [--dim 1048576] [--repeats 7] [--clock wall|cpu]

For each mechanism (DDGauss, Skellam) it plans a federation as issue 22 sizes it (100 sites, 20-bit
ring, epsilon 4 over 100 rounds at delta 1e-5, 10 per cent dropout tolerance, clip norm 1; the plan
sets gamma and the noise share) and times, on one core (BLAS limited to one thread), the steps
:func:`fedcore.mechanisms.distributed_encoding.encode_site` adds to a plain secure-aggregation
encoding:

- ``rotation``: clip, pad to 2**20 and the randomized Hadamard transform (signs included);
- ``rounding``: scaling by gamma and conditional randomized rounding (with its norm check);
- ``noise``: the site's noise share, every coin from the CryptoRng;
- ``ring``: the reduction modulo 2**bits (shown, not counted: plain secure aggregation does it too).

It prints the median of ``--repeats`` runs of each step, and their sum over the issue's target of
150 ms as a ratio (at most 1.0 meets it). Timings depend on the machine and its load; this is a
benchmark, not a test, and it never fails on a slow machine. ``--clock cpu`` times by the thread's
CPU time (``time.thread_time``), leaving out the time spent waiting for a core on a shared machine.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: before numpy loads its BLAS

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

from fedcore.crypto.stream import CryptoRng  # noqa: E402
from fedcore.mechanisms.distributed_encoding import (  # noqa: E402
    DistributedEncoding,
    clip_pad_rotate,
    conditional_round,
    draw_noise,
)
from fedcore.privacy.distributed import DistributedNoise  # noqa: E402
from fedcore.privacy.distributed_plan import plan_distributed  # noqa: E402
from fedcore.secagg.encoding import to_ring  # noqa: E402

TARGET_MS = 150.0
SEED = b"benchmark round"


def _time(step: Callable[[], object], *, repeats: int, clock: Callable[[], float]) -> float:
    runs = []
    for _ in range(repeats):
        start = clock()
        step()
        runs.append((clock() - start) * 1e3)
    return statistics.median(runs)


def measure(noise: DistributedNoise, *, dim: int, repeats: int, clock: Callable[[], float]) -> None:
    plan = plan_distributed(
        noise=noise, epsilon=4.0, delta=1e-5, rounds=100, sites=100, colluders=0,
        dropout_tolerance=0.1, bits=20, dim=dim, clip_norm=1.0,
    )  # fmt: skip
    enc = DistributedEncoding.from_plan(plan)
    rng = CryptoRng.from_seed(1, purpose="benchmark")
    update = rng.standard_normal(dim) * 0.01
    rotated = clip_pad_rotate(update, encoding=enc, seed=SEED)

    def rounding() -> np.ndarray:
        return conditional_round(rotated * enc.gamma, bound=enc.rounding_bound, rng=rng)

    v = rounding()

    times = {
        "rotation": _time(
            lambda: clip_pad_rotate(update, encoding=enc, seed=SEED), repeats=repeats, clock=clock
        ),
        "rounding": _time(rounding, repeats=repeats, clock=clock),
        "noise": _time(
            lambda: draw_noise(v.size, encoding=enc, rng=rng), repeats=repeats, clock=clock
        ),
    }
    ring = _time(lambda: to_ring(v, bits=enc.bits), repeats=repeats, clock=clock)
    added = sum(times.values())
    share = "sigma" if noise is DistributedNoise.DGAUSS else "mu"
    print(
        f"{noise.value:8s} gamma={plan.gamma:.4g} {share}={plan.site_noise:.4g} "
        f"d'={enc.padded_dim}: "
        + "  ".join(f"{k} {t:6.1f} ms" for k, t in times.items())
        + f"  | added {added:6.1f} ms = {added / TARGET_MS:.2f} x the {TARGET_MS:.0f} ms target"
        + f"  (ring {ring:.1f} ms, not counted)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1 << 20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    for noise in DistributedNoise:
        measure(noise, dim=args.dim, repeats=args.repeats, clock=clock)


if __name__ == "__main__":
    main()
