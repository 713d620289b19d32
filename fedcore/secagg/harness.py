"""An in-memory driver: n clients and a server wired together, with chosen dropouts at chosen
stages (in the manner of h11's ``ConnectionPair``). Used by tests, benchmarks and users who want
the protocol without a network.

Every message crosses the wire format (encode, then parse) on its way, so the harness exercises the
same bytes a Flower adapter would carry. A client listed as dropping at a stage vanishes before it
sends that stage's message and never comes back; a client that aborts (for example because too
few of its neighbours are left) counts as a dropout too. Time is a parameter: pass ``clock`` (such
as ``time.perf_counter``) to get per-stage timings; the protocol core never reads a clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedcore.crypto import signing
from fedcore.crypto.agreement import derive_rng
from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError, FedcoreError
from fedcore.secagg.client import SecAggClient
from fedcore.secagg.config import Mode, SessionConfig, Stage, default_threshold
from fedcore.secagg.messages import ServerMessage, encode
from fedcore.secagg.server import SecAggServer

STAGES = tuple(Stage)  # in protocol order; the server says which of them a round runs


@dataclass(slots=True)
class RoundReport:
    """What one in-memory round produced and, with a clock, how long each part took."""

    total: np.ndarray
    survivors: tuple[int, ...]
    client_seconds: dict[Stage, list[float]] = field(default_factory=dict)
    server_seconds: dict[Stage, float] = field(default_factory=dict)
    bytes_to_client: dict[int, int] = field(default_factory=dict)
    bytes_from_client: dict[int, int] = field(default_factory=dict)
    transcript: list[tuple[str, int, bytes]] = field(default_factory=list)
    threshold: int = 0
    server: SecAggServer | None = None  # the finished server (its failures, culprits, reports)


def aggregate_in_memory(
    inputs: Mapping[int, np.ndarray],
    *,
    bits: int = 32,
    threshold: int | None = None,
    neighbors: int | None = None,
    dropouts: Mapping[str, Iterable[int]] | None = None,
    seed: int | None = None,
    mode: Mode = Mode.SEMI_HONEST,
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Run one SecAgg round in memory; return ``(total, survivors)``.

    ``inputs``: client id -> 1-D array of unsigned integers below 2**bits, all the same length.
    ``threshold``: None picks :func:`~fedcore.secagg.config.default_threshold`. ``neighbors``: None
    for the complete graph, an even k for the SecAgg+ k-regular graph. ``dropouts``: stage name
    ("advertise", "reveal", "share", "masked_input", "consistency", "unmask") -> ids that vanish
    before sending that stage's message (a stage the round does not run, such as "reveal" with the
    complete graph, makes them vanish before the next stage it runs). ``seed``: None for the OS CSPRNG, an int for a reproducible run.

    ``total`` is the sum modulo 2**bits of the survivors' inputs; ``survivors`` their sorted ids.
    Raises ConfigError for bad arguments, TooFewSurvivors when fewer than t clients remain.
    """
    report = run_in_memory(
        inputs,
        bits=bits,
        threshold=threshold,
        neighbors=neighbors,
        dropouts=dropouts,
        seed=seed,
        mode=mode,
    )
    return report.total, report.survivors


def run_in_memory(
    inputs: Mapping[int, np.ndarray],
    *,
    bits: int = 32,
    threshold: int | None = None,
    neighbors: int | None = None,
    dropouts: Mapping[str, Iterable[int]] | None = None,
    seed: int | None = None,
    mode: Mode = Mode.SEMI_HONEST,
    clock: Callable[[], float] | None = None,
    keep_transcript: bool = False,
    tamper: Callable[[Stage, int, bytes], bytes] | None = None,
) -> RoundReport:
    """:func:`aggregate_in_memory` with the details: timings (given a clock), bytes, transcript.

    ``tamper(stage, client, wire bytes)``: what that client sends instead of its honest answer
    (to play malicious clients in tests); the server takes the result, refusals and all.
    """
    ids = sorted(inputs)
    length = _check_inputs(inputs, bits)
    k = 0 if neighbors is None else neighbors
    t = threshold if threshold is not None else default_threshold(len(ids), neighbors=k, mode=mode)
    vanish = _check_dropouts(dropouts, ids)

    master = CryptoRng() if seed is None else CryptoRng.from_seed(seed, purpose="secagg.harness")
    round_id = master.bytes(16)
    config = SessionConfig(
        round_id=round_id,
        clients=tuple(ids),
        threshold=t,
        length=length,
        bits=bits,
        neighbors=k,
        mode=mode,
    )
    site_keys = {c: master.bytes(32) for c in ids}
    signing_keys = {c: master.bytes(32) for c in ids}
    registry = (
        {c: signing.verify_key_of(signing_keys[c]) for c in ids} if mode is Mode.ACTIVE else None
    )
    clients = {
        c: SecAggClient(
            c,
            rng=derive_rng(site_keys[c], context=b"secagg|" + round_id),
            signing_key=signing_keys[c] if mode is Mode.ACTIVE else None,
            registry=registry,
        )
        for c in ids
    }
    server = SecAggServer(config, registry=registry)
    report = RoundReport(
        total=np.zeros(0, dtype=np.uint64),
        survivors=(),
        threshold=t,
        bytes_to_client=dict.fromkeys(ids, 0),
        bytes_from_client=dict.fromkeys(ids, 0),
    )
    tick = clock if clock is not None else (lambda: 0.0)

    gone: set[int] = set()
    started = tick()
    requests: dict[int, ServerMessage] = server.start()
    server_time = tick() - started
    while (stage := server.stage) is not None:
        for earlier in STAGES[: STAGES.index(stage) + 1]:  # skipped stages' dropouts too
            gone |= vanish.get(earlier, set())
        times: list[float] = []
        for cid, request in requests.items():
            if cid in gone:
                continue
            down = encode(request)
            report.bytes_to_client[cid] += len(down)
            began = tick()
            try:
                up = clients[cid].receive_bytes(
                    down, vector=inputs[cid] if stage is Stage.MASKED_INPUT else None
                )
            except FedcoreError:
                gone.add(cid)  # an aborted client is a dropout
                continue
            times.append(tick() - began)
            if tamper is not None:
                up = tamper(stage, cid, up)
            report.bytes_from_client[cid] += len(up)
            if keep_transcript:
                report.transcript.append(("down", cid, down))
                report.transcript.append(("up", cid, up))
            began = tick()
            try:
                server.receive_bytes(cid, up)
            except FedcoreError:
                pass  # the server closed that client's slot; the round goes on
            server_time += tick() - began
        report.client_seconds[stage] = times
        began = tick()
        if stage is Stage.UNMASK:
            result = server.finish(no_answer=server.pending)
        else:
            requests = server.advance(no_answer=server.pending)
        report.server_seconds[stage] = server_time + tick() - began
        server_time = 0.0
        if stage is Stage.UNMASK:
            break
    report.total = result.total
    report.survivors = tuple(sorted(result.survivors))
    report.server = server
    return report


def _check_inputs(inputs: Mapping[int, np.ndarray], bits: int) -> int:
    if len(inputs) < 2:
        raise ConfigError(f"secure aggregation needs at least 2 inputs, got {len(inputs)}")
    lengths = set()
    for cid, x in inputs.items():
        if not isinstance(x, np.ndarray) or x.ndim != 1 or x.dtype.kind not in "ui":
            raise ConfigError(f"input of client {cid} must be a 1-D integer numpy array")
        if x.size and (int(x.min()) < 0 or int(x.max()) >> bits):
            raise ConfigError(f"input of client {cid} has entries outside [0, 2**{bits})")
        lengths.add(x.shape[0])
    if len(lengths) != 1:
        raise ConfigError(f"all inputs must have the same length, got lengths {sorted(lengths)}")
    return lengths.pop()


def _check_dropouts(
    dropouts: Mapping[str, Iterable[int]] | None, ids: list[int]
) -> dict[Stage, set[int]]:
    out: dict[Stage, set[int]] = {}
    for name, who in (dropouts or {}).items():
        try:
            stage = Stage(name)
        except ValueError:
            raise ConfigError(
                f"unknown stage {name!r}; expected one of {[s.value for s in Stage]}"
            ) from None
        who = set(who)
        unknown = who - set(ids)
        if unknown:
            raise ConfigError(f"dropouts at {name!r} name unknown clients {sorted(unknown)}")
        out[stage] = who
    return out
