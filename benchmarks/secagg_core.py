"""Benchmark of the SecAgg core: time per stage, bytes per client, masking vs. keystream rate.

    .venv/bin/python benchmarks/secagg_core.py --quick          # small grid, under a minute
    .venv/bin/python benchmarks/secagg_core.py                  # n in {10,100,500}, d in {1e5,1e6}
    .venv/bin/python benchmarks/secagg_core.py --n 100 --d 1000000 --graph harary
    .venv/bin/python benchmarks/secagg_core.py --profile --n 100 --d 100000 --k 0 16

Every client and the server run in this one process, one after another, through the in-memory
harness (so every message is encoded and parsed). "client s" is the mean time one client spends
answering that stage; "server s" the server's time for the stage (receiving every answer and
closing the stage). Dropouts ("10%") are clients that vanish after sharing keys and before
sending their masked input: the costly case, since the server must then rebuild their mask keys
and regenerate every mask they shared with a survivor (Bonawitz et al., section 7). "harary" is the
SecAgg+ graph with (k, t) from ``harary_parameters(n, corrupt_fraction=0.05,
dropout_fraction=0.10)``; "complete" uses the default majority threshold.

The masking throughput is measured in the same run as the AES-CTR keystream rate, so the ratio is
meaningful even on a busy machine (for each table row the keystream rate is measured just before
and just after the round, and "mask/ks" divides the client's masked-input rate, all its masks'
bytes over the stage's time, by their mean): keystream = AES-256-CTR written into a preallocated
4 MiB buffer; masking = ``add_keystream`` (keystream in L2-sized chunks, added in place to a uint32
vector of length d). Benchmarks never fail: they print.
"""

from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedcore.crypto import CryptoRng  # noqa: E402
from fedcore.crypto.agreement import derive_rng  # noqa: E402
from fedcore.crypto.expand import add_keystream  # noqa: E402
from fedcore.errors import ConfigError  # noqa: E402
from fedcore.secagg import (  # noqa: E402
    SecAggClient,  # noqa: E402
    Stage,
    harary_parameters,
    run_in_memory,
)
from fedcore.secagg.encoding import EncodingConfig, decode_mean, encode_update  # noqa: E402
from fedcore.secagg.messages import decode_server_message  # noqa: E402

STAGES = [Stage.ADVERTISE, Stage.REVEAL, Stage.SHARE, Stage.MASKED_INPUT, Stage.UNMASK]
SHORT = {
    Stage.ADVERTISE: "adv",
    Stage.REVEAL: "reveal",
    Stage.SHARE: "share",
    Stage.MASKED_INPUT: "mask",
    Stage.UNMASK: "unmask",
}


def keystream_rate(total_bytes: int = 1 << 30) -> float:
    """Bytes per second of AES-256-CTR keystream into a reused 4 MiB buffer."""
    rng = CryptoRng.from_seed(0, purpose="bench")
    buf = np.empty(1 << 22, dtype=np.uint8)
    rng.fill(buf)  # warm up
    reps = max(1, total_bytes // buf.nbytes)
    began = time.perf_counter()
    for _ in range(reps):
        rng.fill(buf)
    return reps * buf.nbytes / (time.perf_counter() - began)


def masking_rate(d: int, total_bytes: int = 1 << 30) -> float:
    """Bytes per second of mask added in place to a uint32 vector of length d."""
    acc = np.zeros(d, dtype=np.uint32)
    add_keystream(acc, bytes(32))
    reps = max(1, total_bytes // acc.nbytes)
    began = time.perf_counter()
    for i in range(reps):
        add_keystream(acc, i.to_bytes(32, "little"), subtract=bool(i & 1))
    return reps * acc.nbytes / (time.perf_counter() - began)


def graph_for(n: int, graph: str) -> tuple[int | None, int | None]:
    """(neighbors, threshold) for the harness: None, None for the complete graph."""
    if graph == "complete":
        return None, None
    try:
        p = harary_parameters(n, corrupt_fraction=0.05, dropout_fraction=0.10)
    except ConfigError:
        return None, None
    return p.neighbors, p.threshold


def run_one(n: int, d: int, graph: str, dropout: float, bits: int) -> dict[str, Any] | None:
    neighbors: int | None = None
    threshold: int | None = None
    if graph == "harary":
        try:
            p = harary_parameters(n, corrupt_fraction=0.05, dropout_fraction=0.10)
        except ConfigError:
            return None
        neighbors, threshold = p.neighbors, p.threshold
        if neighbors >= n - 1:
            return None  # the helper's graph would be complete: nothing to compare
    rng = CryptoRng.from_seed(n * 7 + d, purpose="bench.inputs")
    inputs = {
        c: rng.integers_below_pow2(d, bits).astype(np.uint32 if bits <= 32 else np.uint64)
        for c in range(n)
    }
    lost = math.ceil(dropout * n)
    dropouts = {"masked_input": set(range(1, 1 + 2 * lost, 2))} if lost else None
    ks_before = keystream_rate(1 << 26)
    began = time.perf_counter()
    report = run_in_memory(
        inputs,
        bits=bits,
        threshold=threshold,
        neighbors=neighbors,
        dropouts=dropouts,
        seed=1,
        clock=time.perf_counter,
    )
    wall = time.perf_counter() - began
    ks = (ks_before + keystream_rate(1 << 26)) / 2  # the machine may be shared: measure around
    expected = np.zeros(d, dtype=np.uint64)
    for c in report.survivors:
        expected += inputs[c]
    expected &= np.uint64((1 << bits) - 1)
    ok = bool(np.array_equal(report.total.astype(np.uint64), expected))
    k = neighbors if neighbors is not None else n - 1
    masks = 1 + k  # a survivor masks with every neighbour that shared keys (dropouts here did)
    mask_time = statistics.mean(report.client_seconds[Stage.MASKED_INPUT])
    return {
        "n": n,
        "d": d,
        "graph": graph if graph == "complete" else f"harary k={k}",
        "t": report.threshold,
        "drop": f"{dropout:.0%}",
        # a stage the round does not run (reveal with the complete graph) counts as 0
        "client": {s: statistics.mean(report.client_seconds.get(s) or [0.0]) for s in STAGES},
        "server": {s: report.server_seconds.get(s, 0.0) for s in STAGES},
        "bytes": statistics.mean(
            report.bytes_to_client[c] + report.bytes_from_client[c] for c in range(n)
        ),
        "up": statistics.mean(report.bytes_from_client[c] for c in range(n)),
        "mask_rate": masks * d * (4 if bits <= 32 else 8) / mask_time,
        "ks": ks,
        "wall": wall,
        "ok": ok,
    }


# Where a round's time goes, by the function that spends it (cProfile "tottime"): the first
# pattern a function's "file:name" contains decides its group.
GROUPS = [
    ("mask expansion", ("expand.py", "update_into", "create_encryption_ctx")),
    ("X25519", ("x25519", "agreement.py:agree", "agreement.py:x25519", "AgreementKey")),
    ("HKDF/HMAC", ("hmac", "derive_key")),
    ("Shamir", ("shamir.py",)),
    ("AEAD seal/open", ("aead.py", "AESGCM")),
    ("wire encode/parse", ("wire.py", "messages.py", "pack", "unpack", "from_bytes", "to_bytes")),
]


def profile_round(n: int, d: int, k: int) -> None:
    """One round at (n, d, k): stage times unprofiled, then a profiled rerun split by group, then
    the cost of SecAggClient.rebuild before the masked-input and the unmask stage."""
    rng = CryptoRng.from_seed(n * 7 + d, purpose="bench.inputs")
    inputs = {c: rng.integers_below_pow2(d, 32).astype(np.uint32) for c in range(n)}
    kw: dict[str, Any] = {"neighbors": k or None, "seed": 1}
    ks = keystream_rate(1 << 26)
    report = run_in_memory(inputs, clock=time.perf_counter, keep_transcript=True, **kw)
    total = sum(
        sum(report.client_seconds.get(s, [])) + report.server_seconds.get(s, 0.0) for s in STAGES
    )
    masks = n * (1 + (k or n - 1)) * d * 4  # bytes of client mask; the server adds n more
    print(
        f"\nn={n} d={d} k={k or n - 1} t={report.threshold}: round {total:.2f} s "
        f"(all clients + server, one core); client masks alone at the raw AES-CTR rate "
        f"({ks / 1e9:.2f} GB/s) would take {masks / ks:.2f} s"
    )
    for s in STAGES:
        c = report.client_seconds.get(s)
        if not c:
            continue
        print(
            f"  {s.value:>13}: client mean {statistics.mean(c) * 1e3:8.2f} ms, "
            f"all clients {sum(c):6.2f} s, server {report.server_seconds[s]:6.3f} s"
        )
    profiler = cProfile.Profile()
    profiler.enable()
    run_in_memory(inputs, **kw)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    spent = dict.fromkeys([g for g, _ in GROUPS] + ["other (numpy checks, copies, logic)"], 0.0)
    for (file, _, name), (_, _, tottime, _, _) in stats.items():
        label = f"{Path(file).name}:{name}"
        group = next((g for g, pats in GROUPS if any(p in label for p in pats)), None)
        spent[group or "other (numpy checks, copies, logic)"] += tottime
    whole = sum(spent.values())
    print("  profiled split: " + ", ".join(f"{g} {t / whole:.0%}" for g, t in spent.items()))
    master = CryptoRng.from_seed(1, purpose="secagg.harness")
    round_id = master.bytes(16)
    site_keys = {c: master.bytes(32) for c in range(n)}
    for upto, stage in ((2, "masked-input"), (3, "unmask")):
        times = []
        for cid in range(0, n, max(1, n // 10)):
            down = [b for way, c, b in report.transcript if way == "down" and c == cid]
            history = [decode_server_message(b) for b in down[:upto]]
            began = time.perf_counter()
            rng_c = derive_rng(site_keys[cid], context=b"secagg|" + round_id)
            SecAggClient.rebuild(cid, history, rng=rng_c)
            times.append(time.perf_counter() - began)
        print(f"  rebuild before the {stage} stage: {statistics.median(times) * 1e3:.2f} ms")


def encoding_error(sites: int = 10, d: int = 100_000) -> None:
    """Error of the weighted mean for our encoding and for Flower's SecAgg+ quantisation."""
    configs = {
        "default": EncodingConfig(),
        "round": EncodingConfig.for_round(sites=sites),
        "round, c=8": EncodingConfig.for_round(sites=sites, clip=8.0),
    }
    print(
        f"\nencoding error of the weighted mean (RMS over {d} coordinates), {sites} sites, "
        "updates uniform in [-0.5, 0.5], equal weights:"
    )
    print(
        "  default    = EncodingConfig(): bits 32, clip 1, max_total_weight 2**20\n"
        f"  round      = EncodingConfig.for_round(sites={sites}): clip 1, max_total_weight "
        f"{configs['round'].max_total_weight}\n"
        "  round, c=8 = the same at Flower's clipping range 8\n"
        "  flwr       = Flower 1.41 SecAgg+ defaults: clip 8, 2**22 levels, max_weight 1000"
    )
    print(
        f"{'weight/site':>11} "
        + " ".join(f"{name:>12}" for name in configs)
        + f" {'flwr':>12} {'bound (round)':>14}"
    )
    rng = CryptoRng.from_seed(5, purpose="bench.encoding")
    for w in (1, 10, 100, 1000):
        updates = [rng.uniform(d) - 0.5 for _ in range(sites)]
        exact = sum(updates) / sites
        errors = []
        for cfg in configs.values():
            total = np.zeros(d + 1, dtype=np.uint64)
            for u in updates:
                total += encode_update(u, weight=w, config=cfg, rng=rng)
            mean, _ = decode_mean(total & np.uint64(0xFFFFFFFF), config=cfg)
            errors.append(float(np.sqrt(np.mean((mean - exact) ** 2))))
        flwr = _flower_rms(updates, w, sites)
        bound = configs["round"].error_bound(sites=sites, total_weight=w * sites)
        print(
            f"{w:>11} " + " ".join(f"{e:>12.3e}" for e in errors) + f" {flwr:>12.3e} {bound:>14.3e}"
        )


def _flower_rms(updates: list[np.ndarray], weight: int, sites: int) -> float:
    """Flower 1.41's SecAgg+ arithmetic at its defaults (clipping range 8, 2**22 levels,
    max_weight 1000), as secaggplus_mod quantises and SecAggPlusWorkflow dequantises."""
    try:
        from flwr.common.secure_aggregation.quantization import dequantize, quantize
    except ImportError:  # pragma: no cover
        return float("nan")
    clipping, target, max_weight = 8.0, 1 << 22, 1000.0
    q_ratio = round(weight / max_weight * target)  # client: the weight, quantised
    dq_ratio = q_ratio / target
    np.random.seed(0)  # Flower's stochastic rounding draws from numpy's global generator
    total = np.zeros(len(updates[0]), dtype=np.int64)
    for u in updates:
        total += quantize([u * dq_ratio], clipping, target)[0].astype(np.int64)
    q_total = q_ratio * sites
    agg = dequantize([total], clipping, target)[0]  # server: as in the workflow's unmask step
    agg += -(sites - 1) * clipping
    agg *= target / q_total
    exact = sum(updates) / sites
    return float(np.sqrt(np.mean((agg - exact) ** 2)))


def _format(row: dict[str, Any]) -> str:
    client, server = row["client"], row["server"]
    return (
        f"{row['n']:>4} {row['d']:>8} {row['graph']:>13} {row['t']:>4} {row['drop']:>4} |"
        + "".join(f" {client[s]:>8.3f}" for s in STAGES)
        + " |"
        + "".join(f" {server[s]:>8.3f}" for s in STAGES)
        + f" | {row['bytes'] / 1e3:>10.1f} {row['mask_rate'] / row['ks']:>7.0%} {row['wall']:>7.1f}"
        + f" {'yes' if row['ok'] else 'NO'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="n in {10, 30}, d in {1e4, 1e5}")
    parser.add_argument("--n", type=int, nargs="*", default=None)
    parser.add_argument("--d", type=int, nargs="*", default=None)
    parser.add_argument("--graph", choices=["complete", "harary", "both"], default="both")
    parser.add_argument("--dropout", type=float, nargs="*", default=[0.0, 0.1])
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--no-encoding", action="store_true")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="per-round split by stage and by kind of work, and rebuild cost, for --n/--d/--k",
    )
    parser.add_argument("--k", type=int, nargs="*", default=[0, 16], help="0: complete graph")
    parser.add_argument(
        "--budget-gb",
        type=float,
        default=None,
        help="skip configurations whose clients would expand more keystream than this, in GB",
    )
    args = parser.parse_args()
    if args.profile:
        for n in args.n or [100]:
            for d in args.d or [100_000]:
                for k in args.k:
                    profile_round(n, d, k)
        return
    ns = args.n or ([10, 30] if args.quick else [10, 100, 500])
    ds = args.d or ([10_000, 100_000] if args.quick else [100_000, 1_000_000])
    graphs = ["complete", "harary"] if args.graph == "both" else [args.graph]

    ks = keystream_rate(1 << 28 if args.quick else 1 << 30)
    print(f"AES-256-CTR keystream: {ks / 1e9:.2f} GB/s (one core, this run)")
    for d in ds:
        mr = masking_rate(d, 1 << 28 if args.quick else 1 << 30)
        print(f"add_keystream into uint32[{d}]: {mr / 1e9:.2f} GB/s = {mr / ks:.0%} of keystream")

    head = (
        f"{'n':>4} {'d':>8} {'graph':>13} {'t':>4} {'drop':>4} |"
        + "".join(f" {'c.' + SHORT[s]:>8}" for s in STAGES)
        + " |"
        + "".join(f" {'s.' + SHORT[s]:>8}" for s in STAGES)
        + f" | {'KB/client':>10} {'mask/ks':>7} {'wall s':>7} ok"
    )
    print("\nc.* = seconds per client for the stage, s.* = server seconds for the stage")
    print(head + "\n" + "-" * len(head))
    for n in ns:
        for d in ds:
            for graph in graphs:
                k, _ = graph_for(n, graph)
                width = 4 if args.bits <= 32 else 8
                gb = n * (1 + (k if k is not None else n - 1)) * d * width / 1e9
                if args.budget_gb is not None and gb > args.budget_gb:
                    print(f"{n:>4} {d:>8} {graph:>13}  skipped: {gb:.0f} GB of client keystream")
                    continue
                for dropout in args.dropout:
                    row = run_one(n, d, graph, dropout, args.bits)
                    if row is None:
                        print(f"{n:>4} {d:>8} {graph:>13}  (no sparse graph for this n)")
                        continue
                    print(_format(row), flush=True)
    if not args.no_encoding:
        encoding_error(d=20_000 if args.quick else 100_000)


if __name__ == "__main__":
    main()
