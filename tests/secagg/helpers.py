"""A step-by-step driver for the SecAgg machines, for tests that need to stop between stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedcore.crypto import CryptoRng
from fedcore.crypto.agreement import derive_rng
from fedcore.secagg import (
    AggregateResult,
    Mode,
    SecAggClient,
    SecAggServer,
    ServerState,
    SessionConfig,
)
from fedcore.secagg.floors import Floors
from fedcore.secagg.harness import build_round
from fedcore.secagg.messages import ClientMessage, ServerMessage


@dataclass
class World:
    config: SessionConfig
    server: SecAggServer
    clients: dict[int, SecAggClient]
    inputs: dict[int, np.ndarray]
    site_keys: dict[int, bytes]
    signing_keys: dict[int, bytes]
    registry: dict[int, bytes] | None
    requests: dict[int, ServerMessage] = field(default_factory=dict)
    history: dict[int, list[ServerMessage]] = field(default_factory=dict)
    answers: dict[int, ClientMessage] = field(default_factory=dict)
    # step() runs the reveal stage of a sparse graph along with the advertise stage, so that
    # tests count stages as in the complete graph; False to stop in the reveal stage.
    auto_reveal: bool = True

    def client_rng(self, cid: int) -> CryptoRng:
        return derive_rng(self.site_keys[cid], context=b"secagg|" + self.config.round_id)

    def answer(self, cid: int) -> ClientMessage:
        """Client ``cid`` answers its current request (recorded in its history)."""
        request = self.requests[cid]
        self.history.setdefault(cid, []).append(request)
        vector = self.inputs[cid] if type(request).__name__ == "MaskedInputRequest" else None
        out = self.clients[cid].receive(request, vector=vector)
        self.answers[cid] = out
        return out

    def step(self, *, skip: set[int] | frozenset[int] = frozenset()) -> None:
        """Everyone not in ``skip`` answers and the server receives; then the stage advances."""
        for cid in sorted(self.requests):
            if cid in skip:
                continue
            self.server.receive(cid, self.answer(cid))
        self.requests = self.server.advance(no_answer=self.server.pending)
        if self.auto_reveal and self.server.state is ServerState.REVEAL:
            self.step()

    def finish(self, *, skip: set[int] | frozenset[int] = frozenset()) -> AggregateResult:
        for cid in sorted(self.requests):
            if cid in skip:
                continue
            self.server.receive(cid, self.answer(cid))
        return self.server.finish(no_answer=self.server.pending)


def make_world(
    n: int = 5,
    *,
    length: int = 8,
    bits: int = 32,
    threshold: int | None = None,
    neighbors: int = 0,
    mode: Mode = Mode.SEMI_HONEST,
    seed: int = 0,
    ids: list[int] | None = None,
    floors: dict[int, Floors] | None = None,
    allow_unsafe: bool = False,
) -> World:
    """The harness's set-up (:func:`fedcore.secagg.harness.build_round`), then each site's input."""
    ids = sorted(ids) if ids is not None else list(range(n))
    master = CryptoRng.from_seed(seed, purpose="tests.secagg.world")
    r = build_round(
        ids,
        master=master,
        length=length,
        bits=bits,
        threshold=threshold or None,
        neighbors=neighbors,
        mode=mode,
        floors=floors,
        allow_unsafe=allow_unsafe,
    )
    inputs = {c: master.integers_below_pow2(length, bits) for c in ids}
    w = World(r.config, r.server, r.clients, inputs, r.site_keys, r.signing_keys, r.registry)
    w.requests = r.server.start()
    return w


def plain_sum(inputs: dict[int, np.ndarray], ids: object, bits: int) -> np.ndarray:
    total = np.zeros(len(next(iter(inputs.values()))), dtype=object)
    for c in ids:  # type: ignore[attr-defined]
        total = total + inputs[c].astype(object)
    return np.array([int(v) % (1 << bits) for v in total], dtype=np.uint64)
