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

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedcore.crypto import signing
from fedcore.crypto.agreement import derive_rng
from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError, FedcoreError, LocalProtocolError, RemoteProtocolError
from fedcore.secagg.client import SecAggClient
from fedcore.secagg.config import Mode, SessionConfig, Stage, default_threshold
from fedcore.secagg.floors import Floors
from fedcore.secagg.messages import ServerMessage, encode
from fedcore.secagg.server import AggregateResult, SecAggServer

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
    allow_unsafe: bool = False,
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Run one SecAgg round in memory; return ``(total, survivors)``.

    ``inputs``: client id -> 1-D array of unsigned integers below 2**bits, all the same length.
    ``threshold``: None picks :func:`~fedcore.secagg.config.default_threshold`. ``neighbors``: None
    for the complete graph, an even k for the SecAgg+ k-regular graph. ``dropouts``: stage name
    ("advertise", "reveal", "share", "masked_input", "consistency", "unmask") -> ids that vanish
    before sending that stage's message (a stage the round does not run, such as "reveal" with the
    complete graph, makes them vanish before the next stage it runs). ``seed``: None for the OS CSPRNG, an int for a reproducible run.

    ``total`` is the sum modulo 2**bits of the survivors' inputs; ``survivors`` their sorted ids.
    Raises ConfigError for bad arguments or settings below the protocol's safe rules (unless
    ``allow_unsafe``, for experiments), TooFewSurvivors when fewer than t clients remain.
    """
    report = run_in_memory(
        inputs,
        bits=bits,
        threshold=threshold,
        neighbors=neighbors,
        dropouts=dropouts,
        seed=seed,
        mode=mode,
        allow_unsafe=allow_unsafe,
    )
    return report.total, report.survivors


@dataclass(slots=True)
class InMemoryRound:
    """One round's set-up: the session, a server, and a client per site with its keys."""

    config: SessionConfig
    server: SecAggServer
    clients: dict[int, SecAggClient]
    site_keys: dict[int, bytes]
    signing_keys: dict[int, bytes]
    registry: dict[int, bytes] | None


def build_round(
    ids: Sequence[int],
    *,
    master: CryptoRng,
    length: int,
    bits: int = 32,
    threshold: int | None = None,
    neighbors: int = 0,
    mode: Mode = Mode.SEMI_HONEST,
    floors: Mapping[int, Floors] | None = None,
    allow_unsafe: bool = False,
) -> InMemoryRound:
    """Draw a round id and every site's keys from ``master`` (in that order) and wire the machines.

    ``threshold``: None picks :func:`~fedcore.secagg.config.default_threshold`. ``floors``: a
    client's floors by id (default :class:`Floors`); ``allow_unsafe``: every client drops the safe
    rules (experiments only). Raises ConfigError for settings below the safe rules unless
    ``allow_unsafe``, before any client is built.
    """
    t = (
        threshold
        if threshold is not None
        else default_threshold(len(ids), neighbors=neighbors, mode=mode)
    )
    config = SessionConfig(
        round_id=master.bytes(16),
        clients=tuple(ids),
        threshold=t,
        length=length,
        bits=bits,
        neighbors=neighbors,
        mode=mode,
    )
    if not allow_unsafe:
        try:
            Floors().check(config)
        except RemoteProtocolError as exc:
            raise ConfigError(f"{exc} (pass allow_unsafe=True for an experiment)") from None
    site_keys = {c: master.bytes(32) for c in ids}
    signing_keys = {c: master.bytes(32) for c in ids}
    active = mode is Mode.ACTIVE
    registry = {c: signing.verify_key_of(signing_keys[c]) for c in ids} if active else None
    clients = {
        c: SecAggClient(
            c,
            rng=derive_rng(site_keys[c], context=b"secagg|" + config.round_id),
            signing_key=signing_keys[c] if active else None,
            registry=registry,
            floors=(floors or {}).get(c),
            allow_unsafe=allow_unsafe,
        )
        for c in ids
    }
    server = SecAggServer(config, registry=registry)
    return InMemoryRound(config, server, clients, site_keys, signing_keys, registry)


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
    floors: Mapping[int, Floors] | None = None,
    allow_unsafe: bool = False,
) -> RoundReport:
    """:func:`aggregate_in_memory` with the details: timings (given a clock), bytes, transcript.

    ``tamper(stage, client, wire bytes)``: what that client sends instead of its honest answer
    (to play malicious clients in tests); the server takes the result, refusals and all.
    ``floors``, ``allow_unsafe``: as for :func:`build_round`.
    """
    ids = sorted(inputs)
    length = _check_inputs(inputs, bits)
    vanish = _check_dropouts(dropouts, ids)
    master = CryptoRng() if seed is None else CryptoRng.from_seed(seed, purpose="secagg.harness")
    world = build_round(
        ids,
        master=master,
        length=length,
        bits=bits,
        threshold=threshold,
        neighbors=0 if neighbors is None else neighbors,
        mode=mode,
        floors=floors,
        allow_unsafe=allow_unsafe,
    )
    server = world.server
    report = RoundReport(
        total=np.zeros(0, dtype=np.uint64),
        survivors=(),
        threshold=world.config.threshold,
        bytes_to_client=dict.fromkeys(ids, 0),
        bytes_from_client=dict.fromkeys(ids, 0),
        server=server,
    )
    wire = _Wire(world, inputs, report, clock or (lambda: 0.0), keep_transcript, tamper)
    result = wire.run(vanish)
    report.total = result.total
    report.survivors = tuple(sorted(result.survivors))
    return report


@dataclass(slots=True)
class _Wire:
    """Carries one stage's requests to the clients and their answers back, over the wire format,
    counting bytes and (given a clock) time in the report."""

    world: InMemoryRound
    inputs: Mapping[int, np.ndarray]
    report: RoundReport
    tick: Callable[[], float]
    keep_transcript: bool
    tamper: Callable[[Stage, int, bytes], bytes] | None

    def run(self, vanish: Mapping[Stage, set[int]]) -> AggregateResult:
        """Drive the round stage by stage, as the server orders them, to its unmasked sum."""
        server, report = self.world.server, self.report
        started = self.tick()
        requests: dict[int, ServerMessage] = server.start()
        server_time = self.tick() - started
        gone: set[int] = set()
        while (stage := server.stage) is not Stage.UNMASK:
            if stage is None:  # pragma: no cover - advance() either moves on or raises
                raise LocalProtocolError("the server stopped before the unmask stage")
            server_time += self._answer(stage, requests, gone, vanish)
            began = self.tick()
            requests = server.advance(no_answer=server.pending)
            report.server_seconds[stage] = server_time + self.tick() - began
            server_time = 0.0
        server_time += self._answer(stage, requests, gone, vanish)
        began = self.tick()
        result = server.finish(no_answer=server.pending)
        report.server_seconds[stage] = server_time + self.tick() - began
        return result

    def _answer(
        self,
        stage: Stage,
        requests: Mapping[int, ServerMessage],
        gone: set[int],
        vanish: Mapping[Stage, set[int]],
    ) -> float:
        for earlier in STAGES[: STAGES.index(stage) + 1]:  # skipped stages' dropouts too
            gone |= vanish.get(earlier, set())
        return self.run_stage(stage, requests, gone)

    def run_stage(
        self, stage: Stage, requests: Mapping[int, ServerMessage], gone: set[int]
    ) -> float:
        """Every client not ``gone`` answers; an aborted client joins ``gone``. Returns the
        server's time spent taking the answers."""
        report, server_time = self.report, 0.0
        times: list[float] = []
        for cid, request in requests.items():
            if cid in gone:
                continue
            down = encode(request)
            report.bytes_to_client[cid] += len(down)
            began = self.tick()
            try:
                vector = self.inputs[cid] if stage is Stage.MASKED_INPUT else None
                up = self.world.clients[cid].receive_bytes(down, vector=vector)
            except FedcoreError:
                gone.add(cid)  # an aborted client is a dropout
                continue
            times.append(self.tick() - began)
            if self.tamper is not None:
                up = self.tamper(stage, cid, up)
            report.bytes_from_client[cid] += len(up)
            if self.keep_transcript:
                report.transcript.extend([("down", cid, down), ("up", cid, up)])
            began = self.tick()
            try:
                self.world.server.receive_bytes(cid, up)
            except FedcoreError:
                pass  # the server closed that client's slot; the round goes on
            server_time += self.tick() - began
        report.client_seconds[stage] = times
        return server_time


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
