"""Seconds per steady-state round at many synthetic sites: fedcore, bare Flower, and the floor.

Every site holds about 48 training examples of the synthetic dataset (20 features, 4 classes;
``synthetic.samples = 75 * sites``) and trains fedcore's MLP for one local epoch (batch 16). A
round is the same work everywhere: every site trains, the weighted average, every site evaluates
the new model, central evaluation on the server's held-out set. Measured in one run:

- **fedcore**: ``fedcore simulate`` (a fresh process; many sites per simulated node by default,
  ``--sites-per-node 1`` for one Flower node per site); its peak memory is the sum of the
  proportional set sizes (PSS: a page shared by k processes counts 1/k in each) of the process
  and all its descendants (Ray's daemons and workers), sampled every 0.2 s, with the sum of their
  resident set sizes beside it (RSS counts every shared page once per process mapping it: torch's
  libraries in each of them, Ray's shared-memory object store in the writer and the reader);
- **bare Flower**: benchmarks/bare_flower_app, Flower's own Message-API ``FedAvg.start`` with one
  Flower node per site, on the same simulation engine;
- **floor**: fedcore's own ``train_round`` and ``evaluate_round`` for every site, then the weighted
  average and central evaluation, in this process on one thread, no messaging.

A steady-state round is the median gap between successive round ends from round 2 on (round 1
carries Ray's start-up and the first data load). Runs that did not train (a failed site, or final
accuracy not above chance) are refused: a failing engine looks fast.

    python benchmarks/scale.py [--sites 100 1000 10000] [--bare-sites 100 1000] [--rounds 3]

Goals (issue 13): fedcore at most 1.5x the floor at 100 sites and 2x at 1,000; peak memory under
4 GiB at 10,000 sites.

``--secagg K`` (issue 24) measures secure aggregation instead of bare Flower, in the same run and
on the same federation: **fedcore SecAgg+** (``secagg.enabled``, ``secagg.neighbors = K``, batched
as plain simulation is), **fedcore plain** and the **floor** as above, and the **mask floor**: the
keystream the masks alone cost in a round, every site expanding ``K + 1`` masks (its self mask and
one per neighbour) over the model's ``d`` parameters and the server removing each survivor's self
mask, ``sites x (K + 2) x d`` words at ``add_keystream``'s rate measured in this process. It
prints SecAgg+ / plain (goal: at most 1.5 at 1,000 sites, k = 40), SecAgg+ / floor, and
(floor + mask floor) / floor, and the SecAgg+ run's mean ``stage_seconds`` per stage (what bounds
the ratio when it is not met).

    python benchmarks/scale.py --secagg 40 --sites 100 1000 [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common
from common import ENV, ROOT, bare_flower, steady

PAGE = os.sysconf("SC_PAGE_SIZE")


def work(sites: int) -> list[str]:
    """The settings of one benchmark federation of ``sites`` sites (``--set`` items)."""
    return [
        f"sites={sites}",
        "dataset=synthetic",
        f"synthetic.samples={75 * sites}",
        "local_epochs=1",
        "batch_size=16",
        "lr=0.2",
        "round_timeout=3600",
    ]


CHANCE = 0.25  # four classes


def learned(name: str, accuracy: list[float], failed: list[int]) -> None:
    common.learned(name, accuracy, failed, above=CHANCE + 0.05)


def pss(pid: int) -> int:
    """The proportional set size of ``pid`` in bytes (its private pages, plus each shared page
    divided by the number of processes sharing it), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class PeakMemory:
    """The peak memory of a process and all its descendants, sampled in a thread: the sum of their
    PSS (each shared page counted once, split among its sharers: the memory the tree takes from
    the machine) and, for comparison, the sum of their RSS (which counts torch's shared libraries
    and Ray's shared-memory object store once per process that maps them)."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid, self.every, self.peak, self.peak_rss = pid, every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree_rss(self) -> tuple[int, int]:
        children: dict[int, list[int]] = {}
        rss: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                pages = int(Path(f"/proc/{entry}/statm").read_text().split()[1])
            except (OSError, ValueError, IndexError):
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
            rss[int(entry)] = pages * PAGE
        total_pss, total_rss, todo = 0, 0, [self.pid]
        while todo:
            pid = todo.pop()
            if pid in rss:
                total_rss += rss[pid]
                total_pss += pss(pid)
            todo += children.get(pid, [])
        return total_pss, total_rss

    def _run(self) -> None:
        while not self._stop.is_set():
            total_pss, total_rss = self._tree_rss()
            self.peak = max(self.peak, total_pss)
            self.peak_rss = max(self.peak_rss, total_rss)
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def fedcore_round(
    sites: int, rounds: int, tmp: Path, per_node: int, extra: tuple[str, ...] = ()
) -> tuple[float, float, int, int]:
    """Steady-state seconds per round, the first round's seconds, and the peak memory (bytes:
    summed PSS, summed RSS); ``extra``: more ``--set`` items (secure aggregation)."""
    out = tmp / f"fedcore-{sites}{'-secagg' if extra else ''}"
    sets = [*work(sites), f"rounds={rounds}", f"simulation.sites_per_node={per_node}", *extra]
    command = [sys.executable, "-m", "fedcore.cli", "simulate", "--out", str(out)]
    for item in sets:
        command += ["--set", item]
    process = subprocess.Popen(
        command, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    memory = PeakMemory(process.pid)
    code = process.wait()
    peak = memory.stop()
    peak_rss = memory.peak_rss
    if code != 0:
        raise SystemExit(f"fedcore simulate failed ({code}); see {out}")
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    learned(
        f"fedcore{' SecAgg+' if extra else ''}, {sites} sites",
        [r["eval_accuracy"] for r in rows],
        [r["sites_failed"] for r in rows],
    )
    if extra:
        STAGES[sites] = stage_means(rows[1:])
    return steady([r["ended_at"] for r in rows]), rows[0]["seconds"], peak, peak_rss


STAGES: dict[int, dict[str, float]] = {}  # sites -> the SecAgg+ run's mean seconds per stage


def stage_means(rows: list[dict]) -> dict[str, float]:
    """Mean ``stage_seconds`` per stage over ``rows`` (the steady-state rounds)."""
    seconds: dict[str, list[float]] = {}
    for row in rows:
        for stage, value in row.get("secagg", {}).get("stage_seconds", {}).items():
            seconds.setdefault(stage, []).append(value)
    return {stage: sum(v) / len(v) for stage, v in seconds.items()}


def model_size(sites: int) -> int:
    """The number of parameters of the benchmark's model (the masks' length)."""
    from fedcore.config import resolve
    from fedcore.data import load_holdout
    from fedcore.federation.server.serve import initial_model
    from fedcore.federation.site.data import data_settings

    settings = resolve(overrides=work(sites))
    _, shape, classes = load_holdout(data_settings(settings))
    model = initial_model(settings, input_shape=shape, num_classes=classes)
    return sum(v.numel() for v in model.state_dict().values())


def mask_floor(sites: int, neighbors: int) -> float:
    """Seconds of keystream the masks of one round cost: every site's ``K + 1`` masks and the
    server's removal of every self mask, ``sites x (K + 2)`` vectors of the model's length, at
    ``add_keystream``'s rate into a uint32 vector (measured here, one thread)."""
    import numpy as np

    from fedcore.crypto.expand import add_keystream

    d = model_size(sites)
    acc = np.zeros(d, dtype=np.uint32)
    add_keystream(acc, bytes(32))
    reps = max(8, (1 << 28) // max(acc.nbytes, 1))
    began = time.perf_counter()
    for i in range(reps):
        add_keystream(acc, i.to_bytes(32, "little"))
    per_vector = (time.perf_counter() - began) / reps
    return sites * (neighbors + 2) * per_vector


def bare_round(sites: int, rounds: int, tmp: Path) -> float:
    out = tmp / f"bare-{sites}.json"
    config = {
        "sites": sites,
        "rounds": rounds,
        "local_epochs": 1,
        "batch_size": 16,
        "lr": 0.2,
        "dataset": "synthetic",
        "samples": 75 * sites,
        "out": str(out),
    }
    result = bare_flower(sites, config, out)
    learned(f"bare Flower, {sites} sites", result["accuracy"][1:], [0])
    return steady(result["ended_at"][1:])  # [0] is the initial evaluation, before round 1


def floor_round(sites: int, rounds: int) -> float:
    """The same rounds with fedcore's own per-site code, one thread, no messaging."""
    import torch

    from fedcore.config import resolve
    from fedcore.data import load_holdout, load_site
    from fedcore.federation.server.serve import initial_model
    from fedcore.federation.site.data import data_settings
    from fedcore.federation.site.rounds import SiteUpdate, evaluate_round, train_round
    from fedcore.training import evaluate

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    settings = resolve(overrides=[*work(sites), "device=cpu"])
    data = data_settings(settings)
    holdout, shape, classes = load_holdout(data)
    model = initial_model(settings, input_shape=shape, num_classes=classes)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ends, accuracy = [time.perf_counter()], []
    for server_round in range(1, rounds + 1):
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items()}
        weight = 0
        for site_id in range(sites):
            site = load_site(data, site_id)
            update = train_round(
                settings,
                site=site,
                global_state=state,
                num_classes=classes,
                input_shape=shape,
                server_round=server_round,
            )
            assert isinstance(update, SiteUpdate)
            for k, v in update.state.items():
                total[k] += v.double() * update.num_examples
            weight += update.num_examples
        state = {k: (v / weight).to(state[k].dtype) for k, v in total.items()}
        for site_id in range(sites):
            evaluate_round(
                settings,
                site=load_site(data, site_id),
                global_state=state,
                num_classes=classes,
                input_shape=shape,
            )
        model.load_state_dict(state)
        accuracy.append(evaluate(model, holdout.x, holdout.y, device=cpu).accuracy)
        ends.append(time.perf_counter())
    learned(f"floor, {sites} sites", accuracy, [0])
    return steady(ends[1:])


def secagg_table(sizes: list[int], rounds: int, per_node: int, neighbors: int) -> None:
    """The ``--secagg K`` table: SecAgg+, plain, the floor and the mask floor, per size."""
    secagg = ("secagg.enabled=true", f"secagg.neighbors={neighbors}")
    print(
        f"{'sites':>6} {'SecAgg+':>9} {'plain':>9} {'floor':>9} {'masks':>9} "
        f"{'SecAgg+/plain':>14} {'SecAgg+/floor':>14} {'(floor+masks)/floor':>20} "
        f"{'SecAgg+ round 1':>16} {'SecAgg+ peak':>13} {'(RSS sum)':>10}"
    )
    print(f"{'':>6} {'s/round':>9} {'s/round':>9} {'s/round':>9} {'s/round':>9}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for sites in sizes:
            floor = floor_round(sites, rounds)
            masks = mask_floor(sites, neighbors)
            plain, _, _, _ = fedcore_round(sites, rounds, Path(tmp), per_node)
            ours, first, peak, peak_rss = fedcore_round(sites, rounds, Path(tmp), per_node, secagg)
            print(
                f"{sites:>6} {ours:>9.3f} {plain:>9.3f} {floor:>9.3f} {masks:>9.3f} "
                f"{ours / plain:>14.2f} {ours / floor:>14.2f} {(floor + masks) / floor:>20.2f} "
                f"{first:>15.1f}s {peak / 2**30:>9.2f} GiB {peak_rss / 2**30:>6.2f} GiB",
                flush=True,
            )
            stages = ", ".join(f"{k} {v:.3f}" for k, v in STAGES.get(sites, {}).items())
            print(f"#   SecAgg+ stage_seconds (mean, rounds 2+): {stages}", flush=True)


def uptime() -> str:
    return ", ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument(
        "--bare-sites", type=int, nargs="*", default=[100, 1000], help="sizes bare Flower runs at"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (at least 2)")
    parser.add_argument(
        "--sites-per-node", type=int, default=0, help="fedcore's simulation.sites_per_node"
    )
    parser.add_argument(
        "--secagg", type=int, metavar="K", help="SecAgg+ with K neighbours against plain fedcore"
    )
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is not steady state)")
    print(f"# {os.cpu_count()} CPUs, load average (1, 5, 15 min) at start: {uptime()}")
    if args.secagg is not None:
        secagg_table(args.sites, args.rounds, args.sites_per_node, args.secagg)
        print(f"# load average at end: {uptime()}")
        return
    header = (
        f"{'sites':>6} {'fedcore':>9} {'bare':>9} {'floor':>9} {'fedcore/floor':>14} "
        f"{'bare/floor':>11} {'fedcore round 1':>16} {'fedcore peak':>13} {'(RSS sum)':>10}"
    )
    print(header + "\n" + f"{'':>6} {'s/round':>9} {'s/round':>9} {'s/round':>9}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for sites in args.sites:
            floor = floor_round(sites, args.rounds)
            ours, first, peak, peak_rss = fedcore_round(
                sites, args.rounds, Path(tmp), args.sites_per_node
            )
            bare = bare_round(sites, args.rounds, Path(tmp)) if sites in args.bare_sites else None
            bare_text = "-" if bare is None else f"{bare:.3f}"
            bare_ratio = "-" if bare is None else f"{bare / floor:.2f}"
            print(
                f"{sites:>6} {ours:>9.3f} {bare_text:>9} {floor:>9.3f} {ours / floor:>14.2f} "
                f"{bare_ratio:>11} {first:>15.1f}s {peak / 2**30:>9.2f} GiB "
                f"{peak_rss / 2**30:>6.2f} GiB",
                flush=True,
            )
    print(f"# load average at end: {uptime()}")


if __name__ == "__main__":
    main()
