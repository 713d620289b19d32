"""A round's cost under distributed DP over secure aggregation without DP (issue 22, Done when:
at most 1.1x at n = 100 sites, d = 10^6 parameters), printed as a ratio measured in one run.

    python benchmarks/distributed_round.py [--sites 100] [--dim 1000000] [--rounds 2]

In one process, without Ray: the real server (:func:`fedcore.federation.server.serve.run_server`)
drives the real ClientApp of every site through an in-memory grid, so the figure is the process
CPU time (``time.process_time``) of the whole federation, robust on a loaded machine. Each site
trains a linear model (``benchmarks/secagg_vs_flower_apps/bench_linear.py``) of ``dim``
parameters on a few synthetic samples, so the round is dominated by what the ratio compares:
masking, unmasking and, with distributed DP, each site's rotation, rounding and noise and the
server's decoding. Both runs use the same secure-aggregation graph; the CPU of the first round
(keys, session set-up) is included in both. Benchmarks are not tests: nothing fails on a slow
machine.
"""

from __future__ import annotations

import argparse
import os
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


def cpu_seconds(*, sites: int, dim: int, rounds: int, dp: bool) -> float:
    from fedcore.federation.server.serve import run_server

    out = Path(tempfile.mkdtemp(prefix="distributed-round-")) / "run"
    settings = _settings(sites=sites, dim=dim, rounds=rounds, out=out, dp=dp)
    start = time.process_time()
    run_server(_Grid(settings), settings, out)
    seconds = time.process_time() - start
    rows = (out / "history.jsonl").read_text().splitlines()
    released = [r for r in rows if '"eval_accuracy"' in r]
    if len(released) != rounds:
        raise SystemExit(f"{out}: {len(released)} of {rounds} rounds completed; no figure")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from flwr.supercore.task_identity import TaskIdentity

    from fedcore.federation.site.folders import SIMULATION_MARKER

    os.environ[SIMULATION_MARKER] = "1"  # sites keep their state under the run record
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    plain = cpu_seconds(sites=args.sites, dim=args.dim, rounds=args.rounds, dp=False)
    noised = cpu_seconds(sites=args.sites, dim=args.dim, rounds=args.rounds, dp=True)
    print(f"n = {args.sites} sites, d = {args.dim} parameters, {args.rounds} rounds (CPU seconds)")
    print(f"  secure aggregation without DP      {plain:8.1f} s")
    print(f"  with distributed DP (dgauss, 20 b) {noised:8.1f} s")
    ratio = noised / plain
    verdict = "within" if ratio <= TARGET else "above"
    print(f"  ratio {ratio:.3f}x ({verdict} the {TARGET}x target)")


if __name__ == "__main__":
    main()
