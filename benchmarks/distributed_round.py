"""A round's cost under distributed DP over secure aggregation without DP (issue 22, Done when:
at most 1.1x at n = 100 sites, d = 10^6 parameters), printed as a ratio measured in one run.

    python benchmarks/distributed_round.py [--sites 100] [--dim 1000000] [--rounds 2] [--pairs 3]

In one process, without Ray: the real server (:func:`fedcore.federation.server.serve.run_server`)
drives the real ClientApp of every site through an in-memory grid, so the figure is the process
CPU time (``time.process_time``) of the whole federation, robust on a loaded machine. Each site
trains a linear model (``benchmarks/secagg_vs_flower_apps/bench_linear.py``) of ``dim``
parameters on a few synthetic samples, so the round is dominated by what the ratio compares:
masking, unmasking and, with distributed DP, each site's rotation, rounding and noise and the
server's decoding. Both runs use the same secure-aggregation graph; the CPU of the first round
(keys, session set-up) is included in both.

The load of other processes moves CPU time by tens of per cent, so the two are measured in the
same invocation, interleaved and repeated: a warm-up pair first (a small federation of each kind,
so that neither measured run pays for imports), then ``--pairs`` pairs in alternating order
(plain first, then DP first, ...). Each pair gives a ratio; the median ratio and the range of the
pairs are printed. Every measured run plans its rounds afresh (the planner's cache is cleared), as
a new server process would. The closing report (``accuracy.png``, with DP ``privacy.png``, and
``summary.md``: :func:`fedcore.report.close_record`) is timed apart and printed in brackets; the
target is read on the rounds without it (the report is written once a run, whatever the rounds),
and the whole run's ratio is printed beside. Benchmarks are not tests: nothing fails on a slow
machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks" / "secagg_vs_flower_apps")]
TARGET = 1.1
CLASSES = 10


def _settings(*, sites: int, dim: int, rounds: int, out: Path, dp: bool):  # noqa: ANN202
    from fedcore.config import resolve

    overrides = [
        f"sites={sites}",
        f"rounds={rounds}",
        "dataset=synthetic",
        f"synthetic.samples={3 * sites}",
        f"synthetic.features={dim // CLASSES - 1}",
        f"synthetic.classes={CLASSES}",
        "model=bench_linear:linear",
        "device=cpu",
        "local_epochs=1",
        "secagg.enabled=true",
        f"out={out}",
    ]
    if dp:
        overrides += ["dp.distributed.epsilon=4"]
    return resolve(overrides=overrides)


class _Grid:
    """Every site's real ClientApp, called in this process (as tests/federation's FakeGrid)."""

    def __init__(self, settings) -> None:  # noqa: ANN001
        from flwr.app import Context, RecordDict

        n = settings.sites
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": n},
                state=RecordDict(),
                run_config=settings.to_run_config(),
            )
            for i, node in enumerate(range(11, 11 + n))
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout):  # noqa: ANN001, ANN201, ARG002
        import clients.app as client_app

        return [client_app.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def cpu_seconds(*, sites: int, dim: int, rounds: int, dp: bool) -> tuple[float, float]:
    """The CPU seconds of one run, and of them those of its closing report (plots, summary)."""
    import fedcore.federation.server.serve as serve
    from fedcore.mechanisms.distributed import clear_plan_cache

    clear_plan_cache()
    out = Path(tempfile.mkdtemp(prefix="distributed-round-")) / "run"
    settings = _settings(sites=sites, dim=dim, rounds=rounds, out=out, dp=dp)
    closing = [0.0]
    close_record = serve.close_record

    def timed_close(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the report, timed apart
        begin = time.process_time()
        try:
            return close_record(*args, **kwargs)
        finally:
            closing[0] += time.process_time() - begin

    serve.close_record = timed_close
    try:
        start = time.process_time()
        serve.run_server(_Grid(settings), settings, out)
        seconds = time.process_time() - start
    finally:
        serve.close_record = close_record
    rows = (out / "history.jsonl").read_text().splitlines()
    released = [r for r in rows if '"eval_accuracy"' in r]
    if len(released) != rounds:
        raise SystemExit(f"{out}: {len(released)} of {rounds} rounds completed; no figure")
    return seconds, closing[0]


def _pair(args: argparse.Namespace, *, dp_first: bool) -> dict[bool, tuple[float, float]]:
    """One (plain, distributed DP) pair of runs, the DP run first when ``dp_first``."""
    size = {"sites": args.sites, "dim": args.dim, "rounds": args.rounds}
    return {dp: cpu_seconds(**size, dp=dp) for dp in ((True, False) if dp_first else (False, True))}


def _spread(ratios: list[float]) -> str:
    ratios = sorted(ratios)
    return (
        f"{statistics.median(ratios):.3f}x (median of {len(ratios)} pairs, range "
        f"{ratios[0]:.3f}x to {ratios[-1]:.3f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=3, help="interleaved (plain, DP) pairs")
    args = parser.parse_args()
    from flwr.supercore.task_identity import TaskIdentity

    from fedcore.federation.site.folders import SIMULATION_MARKER

    os.environ[SIMULATION_MARKER] = "1"  # sites keep their state under the run record
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    for dp in (False, True):  # warm-up: every module loaded before anything is measured
        cpu_seconds(sites=min(args.sites, 10), dim=1000, rounds=1, dp=dp)
    pairs = [_pair(args, dp_first=i % 2 == 1) for i in range(args.pairs)]
    print(f"n = {args.sites} sites, d = {args.dim} parameters, {args.rounds} rounds (CPU seconds;")
    print("the closing report, plots and summary, in brackets: once a run, not a round's cost)")
    print("  pair  secagg alone        distributed DP (dgauss, 20 b)  run ratio  rounds ratio")
    whole, rounds = [], []
    for i, pair in enumerate(pairs):
        (plain, plain_report), (noised, noised_report) = pair[False], pair[True]
        whole.append(noised / plain)
        rounds.append((noised - noised_report) / (plain - plain_report))
        order = "DP first" if i % 2 else "plain first"
        print(
            f"  {i + 1:4d}  {plain:7.1f} s [{plain_report:4.1f}]  {noised:7.1f} s [{noised_report:4.1f}]"
            f"  ({order:11s})  {whole[-1]:.3f}x  {rounds[-1]:.3f}x"
        )
    print(f"  whole run:           {_spread(whole)}")
    verdict = "within" if statistics.median(rounds) <= TARGET else "above"
    print(f"  rounds (no report):  {_spread(rounds)}; {verdict} the {TARGET}x target")


if __name__ == "__main__":
    main()
