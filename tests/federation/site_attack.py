"""A malicious server against the real site code path: the site's ClientApp (mods included) or its
secure-aggregation handler, with its key and round journal on disk and a ``context.state`` the
test can throw away (a new run, a restarted SuperNode).

:class:`Round` is a server machine for one round id whose other participants are honest
in-memory clients; the site under attack is reached through ``ask``, so every test decides what
the server sends it, in which order, and how often.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, MessageType, RecordDict

import clients.app as client_app
from fedcore.config import Settings
from fedcore.crypto import CryptoRng
from fedcore.errors import FedcoreError, RemoteProtocolError
from fedcore.federation import messages as m
from fedcore.federation.simulation import batched
from fedcore.federation.site import registry as secagg_registry
from fedcore.federation.site import secagg as secagg_site
from fedcore.federation.site.secagg import SECAGG, TrainedUpdate
from fedcore.federation.site.store import SiteStore
from fedcore.secagg import SecAggClient, SecAggServer, SessionConfig, SessionEncoding, encode
from fedcore.secagg.config import Mode, ring_dtype
from fedcore.secagg.floors import Floors
from fedcore.secagg.messages import (
    AdvertiseRequest,
    MaskedInputRequest,
    UnmaskRequest,
    decode_client_message,
)

STAGES = {
    AdvertiseRequest: "advertise",
    MaskedInputRequest: "masked_input",
    UnmaskRequest: "unmask",
}
ENCODING = SessionEncoding(clip=4.0, max_total_weight=1 << 20)


class Refused(Exception):
    """The site answered with an error; ``reason`` is the text that reached the server."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def stage_of(request: object) -> str:
    for kind, name in STAGES.items():
        if isinstance(request, kind):
            return name
    return "share" if type(request).__name__ == "ShareKeysRequest" else "consistency"


def session(
    clients: tuple[int, ...],
    *,
    round_id: bytes = b"R" * 16,
    threshold: int | None = None,
    length: int = 8,
    neighbors: int = 0,
    mode: Mode = Mode.SEMI_HONEST,
    encoding: SessionEncoding | None = ENCODING,
) -> SessionConfig:
    from fedcore.secagg.floors import safe_threshold

    n = len(clients)
    return SessionConfig(
        round_id=round_id,
        clients=clients,
        threshold=threshold or safe_threshold(n, neighbors=neighbors, mode=mode),
        length=length,
        neighbors=neighbors,
        mode=mode,
        encoding=encoding,
    )


# ----------------------------------------------------------------------------- the site's handler


@dataclass
class HandlerSite:
    """The site's secure-aggregation handler (:func:`secagg_site.answer_stage`) with its files in
    ``root``, a stub trainer that counts its calls, and a ``context.state`` stand-in."""

    root: Path
    node: int = 1
    floors: Floors = field(default_factory=Floors)
    identity: secagg_registry.SiteIdentity | None = None
    weight: int = 3
    length: int = 8  # the session length the stub trainer produces an update for
    value: float = 0.25  # every coordinate of the stub trainer's update
    state: RecordDict = field(default_factory=RecordDict)
    trained: int = 0

    @property
    def store(self) -> SiteStore:
        return SiteStore(self.root, 0)

    def restart(self) -> None:
        """A new run, or a restarted SuperNode: Flower's state is gone, the disk is not."""
        self.state = RecordDict()

    def train(self, length: int) -> _StubTrainer:
        return _StubTrainer(self, length - 1)

    @property
    def party(self) -> secagg_site.SiteParty:
        return secagg_site.SiteParty(
            client_id=self.node,
            store=self.store,
            registry=self.root / "registry",
            floors=self.floors,
            identity=self.identity,
        )

    def ask(self, request: object) -> bytes:
        payload = encode(request)  # type: ignore[arg-type]
        try:
            return secagg_site.answer_stage(
                secagg_site.request_record(stage=stage_of(request), payload=payload),
                party=self.party,
                state=self.state,
                train=self.train(self.length),
            )
        except FedcoreError as exc:
            raise Refused(f"{type(exc).__name__}: {exc}") from exc


@dataclass
class _StubTrainer:
    """A model of ``size`` parameters whose training counts its calls and returns ``site.value``."""

    site: HandlerSite
    parameters: int

    def size(self) -> int:
        return self.parameters

    def __call__(self) -> TrainedUpdate:
        self.site.trained += 1
        return TrainedUpdate(
            update=np.full(self.parameters, self.site.value), weight=self.site.weight
        )


# ----------------------------------------------------------------------------- the ClientApp


@dataclass
class AppSite:
    """A site as Flower runs it: fedcore's ClientApp (the secagg mod and the train handler), a
    deployment node config (``state-dir`` on the site's disk, plus ``extra``), a fresh
    ``context.state`` per run, and a count of the train handler's calls.

    ``batched``: the site is instead one of the sites a simulated node plays (issue 24): every
    request reaches the node packed as the batched engine sends it, the node's ClientApp plays the
    site (virtual node ``node``, partition ``node - 1``) with its files under the run record,
    ``<root>/run/sites``, and the site's reply is split out of the node's."""

    settings: Settings
    root: Path
    node: int = 1
    partition: int = 0
    extra: dict = field(default_factory=dict)
    context: Context | None = None
    batched: bool = False

    def __post_init__(self) -> None:
        if self.batched:
            if self.extra:
                raise ValueError("a simulated node has no operator node config")
            self.settings = dataclasses.replace(self.settings, out=str(self.root / "run"))
        self.restart()

    def restart(self) -> None:
        node_config = {"partition-id": self.partition, "num-partitions": self.settings.sites}
        if not self.batched:
            node_config.update({"state-dir": str(self.root), **self.extra})
        self.context = Context(
            run_id=1,
            node_id=9000 if self.batched else self.node,
            node_config=node_config,
            state=RecordDict(),
            run_config=self.settings.to_run_config(),
        )

    def model(self) -> tuple[object, object]:
        from fedcore.data import load_holdout
        from fedcore.federation.server.serve import initial_model
        from fedcore.federation.site.data import data_settings

        _, input_shape, num_classes = load_holdout(data_settings(self.settings))
        model = initial_model(self.settings, input_shape=input_shape, num_classes=num_classes)
        arrays = m.state_to_record(model.state_dict())
        config = m.train_config(server_round=1, num_classes=num_classes, input_shape=input_shape)
        return arrays, config

    def dim(self) -> int:
        arrays, _ = self.model()
        return sum(int(np.prod(a.shape)) for a in arrays.values())  # type: ignore[attr-defined]

    def ask(self, request: object) -> bytes:
        stage = stage_of(request)
        content = RecordDict(
            {SECAGG: secagg_site.request_record(stage=stage, payload=encode(request))}  # type: ignore[arg-type]
        )
        if stage == "masked_input":
            arrays, config = self.model()
            content[m.ARRAYS] = arrays  # type: ignore[assignment]
            content[m.CONFIG] = config  # type: ignore[assignment]
        msg = Message(content=content, dst_node_id=self.node, message_type=MessageType.TRAIN)
        assert self.context is not None
        if self.batched:
            packed = batched.pack_request(None, self.context.node_id, [msg])
            (reply,) = batched.unpack_reply(client_app.app(packed, self.context), [msg])
        else:
            reply = client_app.app(msg, self.context)
        if reply.has_error():
            raise Refused(reply.error.reason)
        return reply.content.config_records[SECAGG]["payload"]  # type: ignore[return-value]


# ----------------------------------------------------------------------------- a server machine


class Round:
    """One round id: an honest server machine, honest in-memory peers, and the site under attack
    reached through ``ask``. :meth:`step` runs one stage; what the site was sent is kept."""

    def __init__(
        self,
        config: SessionConfig,
        target: int,
        ask: Callable[[object], bytes],
        seed: int,
        *,
        signing: dict[int, bytes] | None = None,
        registry: dict[int, bytes] | None = None,
    ):
        """ACTIVE mode: ``signing`` holds the peers' Ed25519 seeds and ``registry`` every public
        key the server (and the peers) believe in."""
        self.config, self.target, self.ask = config, target, ask
        self.server = SecAggServer(config, registry=registry)
        self.peers = {
            c: SecAggClient(
                c,
                rng=CryptoRng.from_seed(seed * 1000 + i),
                signing_key=None if signing is None else signing[c],
                registry=registry,
            )
            for i, c in enumerate(config.clients)
            if c != target
        }
        self.requests = self.server.start()
        self.sent: list[object] = []  # every request the site was sent, in order
        self.answers: list[object] = []  # every answer it gave
        self.refusals: list[str] = []
        self.done = False

    def step(self) -> None:
        """Send the current stage's requests; a refusing site is a dropout of the stage."""
        if self.done:
            return
        stage = None
        for client, request in self.requests.items():
            stage = stage_of(request)
            if client == self.target:
                self.sent.append(request)
                try:
                    reply = self.ask(request)
                except Refused as exc:
                    self.refusals.append(exc.reason)
                    continue
                self.answers.append(decode_client_message(reply))
                try:
                    self.server.receive_bytes(client, reply)
                except RemoteProtocolError:
                    pass
            else:
                vector = None
                if isinstance(request, MaskedInputRequest):
                    vector = np.zeros(self.config.length, dtype=ring_dtype(self.config.bits))
                self.server.receive(client, self.peers[client].receive(request, vector=vector))
        try:
            if stage == "unmask":
                self.server.finish(no_answer=self.server.pending)
                self.done = True
            else:
                self.requests = self.server.advance(no_answer=self.server.pending)
        except FedcoreError:
            self.done = True

    def run(self) -> None:
        while not self.done:
            self.step()
