"""The SecAgg server: a sans-IO state machine that collects client messages stage by stage.

Theory of operation (Bonawitz et al., CCS 2017, figure 4, server side; Bell et al., CCS 2020,
section 3): the server learns the sum of the inputs of the clients that reached the masked-input
stage (U3) and nothing else, as long as it behaves semi-honestly and fewer than t clients collude
with it. Each stage ends when every client has answered or the driver reports the rest as not
answering (its deadline passed; there is no clock in here). Dropouts at any stage are recovered:

- U1 (advertised keys) and U2 (sent shares) only shrink the set of clients; the neighbour graph is
  fixed by U1 and a client masks only with neighbours in U2;
- after the masked-input stage the server asks the survivors U3 for the self-mask seeds b_v of
  v in U3 and the mask keys s_v of v in U2 \\ U3, rebuilds each from t shares, and computes
  z = sum_{u in U3} y_u - sum_{u in U3} PRG(b_u) - sum_{v dropped} sum_{u in U3 ∩ N(v)} ±PRG(s_uv).

Before asking anyone to unmask, the server checks that every secret it will need has at least t
holders among the clients it will ask; if not it aborts with TooFewSurvivors and nothing is
revealed. Rebuilt secrets are checked (the mask key against its advertised public key, the seed
against its commitment), so a corrupted share is detected instead of silently giving a wrong sum.

Two kinds of failure. A client that sends something illegal (wrong stage, late, malformed, bad
signature, wrong addressing) fails alone: its slot is closed, it counts as a dropout, and
RemoteProtocolError or InvalidMessage is raised for the driver to report to that client; the round
goes on. Misuse by the driver (LocalProtocolError: wrong state, a stage closed while clients are
still pending) and too few survivors (TooFewSurvivors) move the whole machine to ``ABORTED`` for
good. All legal transitions are in ``_TRANSITIONS``.

The masked inputs are summed as they arrive (in place, modulo 2**32 or 2**64), so the server holds
one vector, not n.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from typing import NoReturn

import numpy as np

from fedcore.crypto import signing
from fedcore.crypto.agreement import AgreementKey, agree
from fedcore.errors import (
    FedcoreError,
    InvalidMessage,
    LocalProtocolError,
    RemoteProtocolError,
)
from fedcore.secagg import recovery, shamir
from fedcore.secagg.config import Mode, SessionConfig, Stage, ring_dtype
from fedcore.secagg.errors import TooFewSurvivors
from fedcore.secagg.graph import NeighborGraph
from fedcore.secagg.messages import (
    AdvertiseRequest,
    ClientMessage,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShare,
    EncryptedShares,
    KeyAdvert,
    MaskedInput,
    MaskedInputRequest,
    ServerMessage,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskShares,
    decode_client_message,
)
from fedcore.secagg.recovery import AggregateResult
from fedcore.secagg.session import advert_signed_bytes, session_id, survivors_signed_bytes


class ServerState(enum.Enum):
    IDLE = "idle"
    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


class Command(enum.Enum):
    """What the driver asks of the server besides handing it a message."""

    START = "start"
    ADVANCE = "advance"
    FINISH = "finish"


_S = ServerState
# The one table of legal transitions: (state, command or message type) -> (next state in
# SEMI_HONEST mode, next state in ACTIVE mode); None where illegal in that mode. A message type
# maps a collecting state to itself. Anything absent is illegal.
_TRANSITIONS: dict[
    tuple[ServerState, Command | type], tuple[ServerState | None, ServerState | None]
] = {
    (_S.IDLE, Command.START): (_S.ADVERTISE, _S.ADVERTISE),
    (_S.ADVERTISE, KeyAdvert): (_S.ADVERTISE, _S.ADVERTISE),
    (_S.ADVERTISE, Command.ADVANCE): (_S.SHARE, _S.SHARE),
    (_S.SHARE, EncryptedShares): (_S.SHARE, _S.SHARE),
    (_S.SHARE, Command.ADVANCE): (_S.MASKED_INPUT, _S.MASKED_INPUT),
    (_S.MASKED_INPUT, MaskedInput): (_S.MASKED_INPUT, _S.MASKED_INPUT),
    (_S.MASKED_INPUT, Command.ADVANCE): (_S.UNMASK, _S.CONSISTENCY),
    (_S.CONSISTENCY, ConsistencySignature): (None, _S.CONSISTENCY),
    (_S.CONSISTENCY, Command.ADVANCE): (None, _S.UNMASK),
    (_S.UNMASK, UnmaskShares): (_S.UNMASK, _S.UNMASK),
    (_S.UNMASK, Command.FINISH): (_S.DONE, _S.DONE),
}
_COLLECTING = frozenset({_S.ADVERTISE, _S.SHARE, _S.MASKED_INPUT, _S.CONSISTENCY, _S.UNMASK})
# A fixed scalar to test advertised keys: any small-order point gives the all-zero secret with
# every clamped scalar (RFC 7748 section 6.1), so one agreement tells whether a key is usable.
_PROBE_PRIVATE = AgreementKey(bytes(range(32)))


class SecAggServer:
    """The server side of one SecAgg round.

    ``registry``: every site's Ed25519 public key by client id (ACTIVE mode only).
    """

    def __init__(
        self, config: SessionConfig, *, registry: Mapping[int, bytes] | None = None
    ) -> None:
        if config.mode is Mode.ACTIVE and registry is None:
            raise LocalProtocolError("ACTIVE mode needs the registry of site keys")
        self.config = config
        self._registry = dict(registry) if registry is not None else {}
        self._state = ServerState.IDLE
        self._error: FedcoreError | None = None
        self._expected: set[int] = set()  # who may still answer the current stage
        self._answered: set[int] = set()
        self._failed: dict[int, str] = {}  # client -> why its slot was closed
        self._adverts: dict[int, KeyAdvert] = {}
        self._keys_taken: set[bytes] = set()
        self._session_id = b""
        self._graph: NeighborGraph | None = None
        self._shares_to: dict[int, list[EncryptedShare]] = {}
        self._u2: frozenset[int] = frozenset()
        self._u3: frozenset[int] = frozenset()
        self._asked_to_unmask: frozenset[int] = frozenset()
        self._signatures: dict[int, ConsistencySignature] = {}
        self._seed_shares: dict[int, dict[int, int]] = {}  # owner -> holder -> share
        self._key_shares: dict[int, dict[int, int]] = {}
        self._total = np.zeros(config.length, dtype=ring_dtype(config.bits))

    # ------------------------------------------------------------------ public surface

    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def stage(self) -> Stage | None:
        """The stage being collected, or None when idle, done or aborted."""
        return Stage(self._state.value) if self._state in _COLLECTING else None

    @property
    def pending(self) -> frozenset[int]:
        """Clients the current stage still waits for."""
        return frozenset(self._expected - self._answered)

    @property
    def failed(self) -> Mapping[int, str]:
        """Clients whose slot was closed for sending something illegal, with the reason."""
        return dict(self._failed)

    @property
    def session_id(self) -> bytes:
        return self._session_id

    @property
    def error(self) -> FedcoreError | None:
        return self._error

    def start(self) -> dict[int, ServerMessage]:
        """Open the advertise stage: one AdvertiseRequest per invited client."""
        self._command(Command.START)
        self._expected = set(self.config.clients)
        self._answered = set()
        return {c: AdvertiseRequest(c, self.config) for c in self.config.clients}

    def receive(self, sender: int, message: ClientMessage) -> None:
        """Take one message from ``sender`` (the identity the transport authenticated).

        Raises LocalProtocolError (and aborts) when the server is not collecting. Raises
        RemoteProtocolError or InvalidMessage when the message breaks a rule: then only that
        client's slot is closed and the server stays in its stage.
        """
        if self._state not in _COLLECTING:
            self._fail_round(
                LocalProtocolError(f"server in state {self._state.value} takes no messages")
            )
        try:
            self._accept(sender, message)
        except FedcoreError as exc:
            self._close_slot(sender, str(exc))
            raise
        except Exception as exc:  # a malformed record built in memory: typed all the same
            self._close_slot(sender, repr(exc))
            raise RemoteProtocolError(f"message from client {sender} failed: {exc!r}") from exc

    def receive_bytes(self, sender: int, data: bytes) -> None:
        """Parse and take one message; a parse failure closes the sender's slot only."""
        if self._state not in _COLLECTING:
            self._fail_round(
                LocalProtocolError(f"server in state {self._state.value} takes no messages")
            )
        try:
            message = decode_client_message(data)
        except FedcoreError as exc:
            self._close_slot(sender, str(exc))
            raise
        self.receive(sender, message)

    def advance(self, *, no_answer: Collection[int] = ()) -> dict[int, ServerMessage]:
        """Close the current stage and return the next stage's requests, by recipient.

        ``no_answer``: the clients that missed the deadline; after them nobody may be pending.
        Raises LocalProtocolError (misuse) or TooFewSurvivors (fewer than t remain); either leaves
        the server ``ABORTED``.
        """
        try:
            nxt = self._target(Command.ADVANCE)
            self._close_stage(no_answer)
            if self._state is ServerState.ADVERTISE:
                requests = self._after_advertise()
            elif self._state is ServerState.SHARE:
                requests = self._after_share()
            elif self._state is ServerState.MASKED_INPUT:
                requests = self._after_masked_input()
            else:
                requests = self._after_consistency()
        except FedcoreError as exc:
            self._fail_round(exc)
        self._state = nxt
        self._expected = set(requests)
        self._answered = set()
        return requests

    def finish(self, *, no_answer: Collection[int] = ()) -> AggregateResult:
        """Close the unmask stage, rebuild the secrets and return the unmasked sum.

        Raises TooFewSurvivors when some secret has fewer than t shares, InvalidMessage when a
        rebuilt secret fails its check, LocalProtocolError on misuse; each leaves ``ABORTED``.
        """
        try:
            nxt = self._target(Command.FINISH)
            self._close_stage(no_answer)
            result = self._unmask()
        except FedcoreError as exc:
            self._fail_round(exc)
        self._state = nxt
        return result

    def abort(self, reason: str = "aborted by the caller") -> None:
        self._state = ServerState.ABORTED
        self._error = self._error or LocalProtocolError(reason)

    # ------------------------------------------------------------------ transitions

    def _target(self, event: Command | type) -> ServerState:
        row = _TRANSITIONS.get((self._state, event))
        target = None if row is None else row[0 if self.config.mode is Mode.SEMI_HONEST else 1]
        if target is None:
            name = event.value if isinstance(event, Command) else event.__name__
            raise LocalProtocolError(f"server in state {self._state.value} cannot {name}")
        return target

    def _command(self, command: Command) -> None:
        try:
            self._state = self._target(command)
        except FedcoreError as exc:
            self._fail_round(exc)

    def _fail_round(self, error: FedcoreError) -> NoReturn:
        """Move to ABORTED and raise ``error`` (typed for mypy as never returning)."""
        self._state = ServerState.ABORTED
        if self._error is None:
            self._error = error
        raise error

    def _close_slot(self, client: int, reason: str) -> None:
        # A client that already answered this stage keeps its slot: its answer is used (a masked
        # input is already in the running sum), and the extra message is only refused.
        if client in self._expected and client not in self._answered:
            self._failed.setdefault(client, reason)
            self._expected.discard(client)

    def _close_stage(self, no_answer: Collection[int]) -> None:
        silent = set(no_answer)
        answered = silent & self._answered
        if answered:
            raise LocalProtocolError(f"clients {sorted(answered)[:5]} answered this stage")
        pending = self._expected - self._answered - silent
        if pending:
            raise LocalProtocolError(
                f"stage closed while clients {sorted(pending)[:5]} are pending; list them in "
                "no_answer once their deadline has passed"
            )
        self._expected -= silent

    # ------------------------------------------------------------------ receiving

    def _accept(self, sender: int, message: ClientMessage) -> None:
        row = _TRANSITIONS.get((self._state, type(message)))
        if row is None or row[0 if self.config.mode is Mode.SEMI_HONEST else 1] is None:
            raise RemoteProtocolError(
                f"a {type(message).__name__} from client {sender} during the "
                f"{self._state.value} stage"
            )
        if sender not in self._expected:
            raise RemoteProtocolError(
                f"client {sender} is not expected in the {self._state.value} stage"
            )
        if sender in self._answered:
            raise RemoteProtocolError(
                f"client {sender} already answered the {self._state.value} stage"
            )
        if getattr(message, "sender", None) != sender:
            raise RemoteProtocolError(f"message from client {sender} claims another sender")
        if message.round_id != self.config.round_id:
            raise RemoteProtocolError(f"message from client {sender} is bound to another round")
        if isinstance(message, KeyAdvert):
            self._on_advert(sender, message)
        elif isinstance(message, EncryptedShares):
            self._on_shares(sender, message)
        elif isinstance(message, MaskedInput):
            self._on_masked_input(sender, message)
        elif isinstance(message, ConsistencySignature):
            self._on_signature(sender, message)
        else:
            self._on_unmask_shares(sender, message)
        self._answered.add(sender)

    def _on_advert(self, sender: int, advert: KeyAdvert) -> None:
        if advert.enc_public == advert.mask_public:
            raise RemoteProtocolError(f"client {sender} advertised the same key twice")
        taken = self._keys_taken
        if advert.enc_public in taken or advert.mask_public in taken:
            raise RemoteProtocolError(f"client {sender} advertised a key another client holds")
        for key in (advert.enc_public, advert.mask_public):
            agree(_PROBE_PRIVATE, key)  # raises InvalidMessage for a small-order key
        if self.config.mode is Mode.ACTIVE:
            site_key = self._registry.get(sender)
            if site_key is None:
                raise RemoteProtocolError(f"client {sender} has no key in the registry")
            signing.verify(site_key, advert.signature, advert_signed_bytes(advert))
        self._adverts[sender] = advert
        taken.update((advert.enc_public, advert.mask_public))

    def _on_shares(self, sender: int, message: EncryptedShares) -> None:
        graph = self._require_graph()
        receivers = [s.receiver for s in message.shares]
        if sorted(receivers) != sorted(graph.neighbors(sender)) or len(set(receivers)) != len(
            receivers
        ):
            raise RemoteProtocolError(f"client {sender} did not send one share to each neighbour")
        if any(s.sender != sender for s in message.shares):
            raise RemoteProtocolError(f"client {sender} sent shares in another client's name")
        for s in message.shares:
            self._shares_to.setdefault(s.receiver, []).append(s)

    def _on_masked_input(self, sender: int, message: MaskedInput) -> None:
        vec = message.vector
        if message.bits != self.config.bits or vec.shape != (self.config.length,):
            raise RemoteProtocolError(
                f"client {sender} sent a vector of shape {vec.shape} over {message.bits} bits, "
                f"expected ({self.config.length},) over {self.config.bits}"
            )
        if vec.dtype != self._total.dtype:
            raise RemoteProtocolError(f"client {sender} sent a vector of dtype {vec.dtype}")
        if vec.size and int(vec.max()) >> self.config.bits:
            raise RemoteProtocolError(f"client {sender} sent entries >= 2**{self.config.bits}")
        np.add(self._total, vec, out=self._total)

    def _on_signature(self, sender: int, message: ConsistencySignature) -> None:
        signed = survivors_signed_bytes(self._session_id, tuple(sorted(self._u3)))
        signing.verify(self._registry[sender], message.signature, signed)
        self._signatures[sender] = message

    def _on_unmask_shares(self, sender: int, message: UnmaskShares) -> None:
        graph = self._require_graph()
        # The graph is undirected: sender holds v's shares iff v is among sender's holders.
        want_seed = self._u3 & graph.holders(sender)
        want_key = (self._u2 - self._u3) & graph.neighbors(sender)
        seed_owners = [s.owner for s in message.seed_shares]
        key_owners = [s.owner for s in message.key_shares]
        if sorted(seed_owners) != sorted(want_seed) or len(set(seed_owners)) != len(seed_owners):
            raise RemoteProtocolError(f"client {sender} revealed the wrong set of seed shares")
        if sorted(key_owners) != sorted(want_key) or len(set(key_owners)) != len(key_owners):
            raise RemoteProtocolError(f"client {sender} revealed the wrong set of key shares")
        for s in (*message.seed_shares, *message.key_shares):
            if not 0 <= s.value < shamir.PRIME:
                raise InvalidMessage(f"share from client {sender} is not a field element")
        for s in message.seed_shares:
            self._seed_shares.setdefault(s.owner, {})[sender] = s.value
        for s in message.key_shares:
            self._key_shares.setdefault(s.owner, {})[sender] = s.value

    # ------------------------------------------------------------------ closing stages

    def _after_advertise(self) -> dict[int, ServerMessage]:
        u1 = frozenset(self._expected)
        self._require(len(u1), "clients advertised keys")
        adverts = tuple(self._adverts[c] for c in sorted(u1))
        self._session_id = session_id(self.config, adverts)
        graph = NeighborGraph(u1, neighbors=self.config.neighbors, session_id=self._session_id)
        self._graph = graph
        self._require(len(graph.holders(adverts[0].sender)), "share holders per client")
        rid = self.config.round_id
        return {c: ShareKeysRequest(c, rid, adverts) for c in sorted(u1)}

    def _after_share(self) -> dict[int, ServerMessage]:
        u2 = frozenset(self._expected)
        self._require(len(u2), "clients shared their keys")
        self._u2 = u2
        rid = self.config.round_id
        requests: dict[int, ServerMessage] = {}
        for u in sorted(u2):
            shares = [s for s in self._shares_to.get(u, []) if s.sender in u2]
            requests[u] = MaskedInputRequest(u, rid, tuple(sorted(shares, key=lambda s: s.sender)))
        self._shares_to.clear()
        return requests

    def _after_masked_input(self) -> dict[int, ServerMessage]:
        u3 = frozenset(self._expected)
        self._u3 = u3
        self._check_recoverable(u3)
        rid, alive = self.config.round_id, tuple(sorted(u3))
        if self.config.mode is Mode.ACTIVE:
            return {u: ConsistencyRequest(u, rid, alive) for u in alive}
        self._asked_to_unmask = u3
        dropped = tuple(sorted(self._u2 - u3))
        return {u: UnmaskRequest(u, rid, alive, dropped) for u in alive}

    def _after_consistency(self) -> dict[int, ServerMessage]:
        u4 = frozenset(self._expected)
        self._require(len(u4), "consistency signatures")
        self._check_recoverable(u4)
        self._asked_to_unmask = u4
        rid, alive = self.config.round_id, tuple(sorted(self._u3))
        dropped = tuple(sorted(self._u2 - self._u3))
        sigs = tuple(self._signatures[u] for u in sorted(u4))
        return {u: UnmaskRequest(u, rid, alive, dropped, sigs) for u in sorted(u4)}

    def _check_recoverable(self, responders: frozenset[int]) -> None:
        """Before anyone unmasks: every secret needed must have t holders among ``responders``."""
        graph = self._require_graph()
        self._require(len(self._u3), "clients sent masked inputs")
        for v in self._u3:
            self._require(len(graph.holders(v) & responders), f"alive holders of client {v}'s seed")
        for v in self._u2 - self._u3:
            if graph.neighbors(v) & self._u3:
                self._require(
                    len(graph.neighbors(v) & responders), f"alive holders of client {v}'s mask key"
                )

    def _require_graph(self) -> NeighborGraph:
        if self._graph is None:
            raise LocalProtocolError("no neighbour graph: the advertise stage has not closed")
        return self._graph

    def _require(self, count: int, what: str) -> None:
        if count < self.config.threshold:
            raise TooFewSurvivors(f"{count} {what}; the threshold is {self.config.threshold}")

    # ------------------------------------------------------------------ unmasking

    def _unmask(self) -> AggregateResult:
        graph = self._require_graph()
        t, rid = self.config.threshold, self.config.round_id
        responders = frozenset(self._expected)

        def revealed(store: dict[int, dict[int, int]], v: int) -> dict[int, int]:
            return {h: y for h, y in store.get(v, {}).items() if h in responders}

        seeds = {
            v: recovery.rebuild_seed(
                v,
                revealed(self._seed_shares, v),
                threshold=t,
                round_id=rid,
                advert=self._adverts[v],
            )
            for v in sorted(self._u3)
        }
        mask_keys = {
            v: recovery.rebuild_mask_key(
                v, revealed(self._key_shares, v), threshold=t, advert=self._adverts[v]
            )
            for v in sorted(self._u2 - self._u3)
            if graph.neighbors(v) & self._u3
        }
        recovery.remove_masks(
            self._total,
            seeds=seeds,
            mask_keys=mask_keys,
            graph=graph,
            survivors=self._u3,
            adverts=self._adverts,
            session_id=self._session_id,
            bits=self.config.bits,
        )
        self._total.flags.writeable = False
        return AggregateResult(self._total, self._u3)
