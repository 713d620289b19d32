"""The SecAgg server: a sans-IO state machine that collects client messages stage by stage.

Theory of operation (Bonawitz et al., CCS 2017, figure 4, server side; Bell et al., CCS 2020,
section 3): the server learns the sum of the inputs of the clients that reached the masked-input
stage (U3) and nothing else, as long as it behaves semi-honestly and fewer than t clients collude
with it. Each stage ends when every client has answered or the driver reports the rest as not
answering (its deadline passed; there is no clock in here). Dropouts at any stage are recovered:

- U1 (advertised keys) and U2 (sent shares) only shrink the set of clients; the neighbour graph is
  fixed by U1 (for a sparse graph, by every member's ring reveal, collected in an extra reveal
  stage that every member of U1 must answer: :mod:`fedcore.secagg.graph`) and a client masks only
  with neighbours in U2 whose share opened at it;
- a client names in its masked input the neighbours whose sealed share did not open (``unopened``):
  for that pair the sender counts as dropped. A client named so by anyone is left out of U3 even if
  its masked input arrived (its secrets may not be recoverable; the sum is formed when the stage
  closes, from the inputs of U3 only), and its pairwise masks are removed only with the survivors
  that did mask with it;
- after the masked-input stage the server asks the survivors U3 for the self-mask seeds b_v of
  v in U3 and the mask keys s_v of v in U2 \\ U3, rebuilds each from t shares, and computes
  z = sum_{u in U3} y_u - sum_{u in U3} PRG(b_u) - sum_{v dropped} sum_{u in U3 ∩ N(v)} ±PRG(s_uv).

Before asking anyone to unmask, the server checks that every secret it will need has at least t
holders with a usable share among the clients it will ask; if not it aborts with TooFewSurvivors
and nothing is revealed. Rebuilt secrets are checked (the mask key against its advertised public
key, the seed against its commitment); a wrong share does not stop the round while t good ones
remain: the secret is decoded around it and its sender is named in :attr:`SecAggServer.culprits`
(:func:`fedcore.secagg.shamir.reconstruct_checked`).

Two kinds of failure. A client that sends something illegal (wrong stage, late, malformed, bad
signature, wrong addressing) fails alone: its slot is closed, it counts as a dropout, and
RemoteProtocolError or InvalidMessage is raised for the driver to report to that client; the round
goes on. Misuse by the driver (LocalProtocolError: wrong state, a stage closed while clients are
still pending) and too few survivors (TooFewSurvivors) move the whole machine to ``ABORTED`` for
good. All legal transitions are in one table (:mod:`fedcore.secagg.state`); the unmask stage
itself, from the shares each survivor must reveal to the unmasked sum, is
:class:`fedcore.secagg.recovery.Recovery`.

The masked inputs are kept as read-only views of the messages' bytes (no copy) and summed in
place, modulo 2**32 or 2**64, when the stage closes and U3 is known.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import NoReturn

import numpy as np

from fedcore.crypto import signing
from fedcore.crypto.agreement import AgreementKey, agree
from fedcore.errors import (
    FedcoreError,
    LocalProtocolError,
    RemoteProtocolError,
)
from fedcore.secagg.config import Mode, SessionConfig, Stage, ring_dtype
from fedcore.secagg.errors import TooFewSurvivors
from fedcore.secagg.graph import NeighborGraph, check_reveal, ring_seed, sparse
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
    RevealRequest,
    RingReveal,
    ServerMessage,
    ShareKeysRequest,
    UnmaskRequest,
    decode_client_message,
)
from fedcore.secagg.recovery import AggregateResult, Recovery
from fedcore.secagg.session import advert_signed_bytes, session_id, survivors_signed_bytes
from fedcore.secagg.state import COLLECTING, Command, ServerState, server_row, server_target

__all__ = ["AggregateResult", "Command", "SecAggServer", "ServerState"]


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
        self._reveals: dict[int, bytes] = {}
        self._u1_adverts: tuple[KeyAdvert, ...] = ()
        self._keys_taken: set[bytes] = set()
        self._session_id = b""
        self._graph: NeighborGraph | None = None
        self._shares_to: dict[int, list[EncryptedShare]] = {}
        self._u2: frozenset[int] = frozenset()
        self._u3: frozenset[int] = frozenset()
        self._signatures: dict[int, ConsistencySignature] = {}
        self._recovery: Recovery | None = None  # the unmask stage, once U3 is fixed
        self._inputs: dict[int, np.ndarray] = {}  # masked inputs, summed when the stage closes
        self._unopened_by: dict[int, set[int]] = {}  # client -> those its sealed share failed at
        self._total = np.zeros(config.length, dtype=ring_dtype(config.bits))

    # ------------------------------------------------------------------ public surface

    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def stage(self) -> Stage | None:
        """The stage being collected, or None when idle, done or aborted."""
        return self._state.stage

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
    def unopened(self) -> Mapping[int, frozenset[int]]:
        """Client -> the neighbours that reported its sealed share did not open (so it was left
        out of U3). The server cannot tell whether the sender sealed garbage or the receiver
        lies; it reports both sides. Of the accused nothing more is revealed than of a dropout;
        a false report (the liar did mask with the accused) spoils the sum, as a bad masked input
        would, and the federation round's plausibility check discards it."""
        return {v: frozenset(us) for v, us in self._unopened_by.items()}

    @property
    def culprits(self) -> Mapping[int, str]:
        """Holders whose revealed shares did not fit the secret rebuilt from the others, with why
        (filled by :meth:`finish`; their shares were left out and the round went on)."""
        return dict(self._recovery.culprits) if self._recovery is not None else {}

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
        if self._state not in COLLECTING:
            self._fail_round(
                LocalProtocolError(f"server in state {self._state.label} takes no messages")
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
        if self._state not in COLLECTING:
            self._fail_round(
                LocalProtocolError(f"server in state {self._state.label} takes no messages")
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
        Raises LocalProtocolError (misuse) or TooFewSurvivors (fewer than t remain, a secret
        would lack t usable shares, or a member of a sparse graph's U1 sent no valid ring reveal:
        nothing secret is revealed in any of these cases); either leaves the server ``ABORTED``.
        """
        try:
            nxt = self._target(Command.ADVANCE)
            self._close_stage(no_answer)
            if self._state is ServerState.ADVERTISE:
                requests = self._after_advertise()
            elif self._state is ServerState.REVEAL:
                requests = self._after_reveal()
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

        Wrong shares are decoded around while t good ones remain, and their senders recorded in
        :attr:`culprits`. Raises TooFewSurvivors when some secret has fewer than t shares,
        InvalidMessage when no t of its shares rebuild a secret that passes its check,
        LocalProtocolError on misuse; each leaves ``ABORTED``.
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
        return server_target(self._state, event, self.config)

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
        if server_row(self._state, type(message), self.config.mode) is None:
            raise RemoteProtocolError(
                f"a {type(message).__name__} from client {sender} during the "
                f"{self._state.label} stage"
            )
        if sender not in self._expected:
            raise RemoteProtocolError(
                f"client {sender} is not expected in the {self._state.label} stage"
            )
        if sender in self._answered:
            raise RemoteProtocolError(
                f"client {sender} already answered the {self._state.label} stage"
            )
        if getattr(message, "sender", None) != sender:
            raise RemoteProtocolError(f"message from client {sender} claims another sender")
        if message.round_id != self.config.round_id:
            raise RemoteProtocolError(f"message from client {sender} is bound to another round")
        if isinstance(message, KeyAdvert):
            self._on_advert(sender, message)
        elif isinstance(message, RingReveal):
            commitment = self._adverts[sender].seed_commitment
            check_reveal(self.config.round_id, sender, message.reveal, commitment)
            self._reveals[sender] = message.reveal
        elif isinstance(message, EncryptedShares):
            self._on_shares(sender, message)
        elif isinstance(message, MaskedInput):
            self._on_masked_input(sender, message)
        elif isinstance(message, ConsistencySignature):
            self._on_signature(sender, message)
        else:
            self._require_recovery().take(sender, message)
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
        unopened = message.unopened
        if list(unopened) != sorted(set(unopened)):
            raise RemoteProtocolError(f"client {sender} listed unopened shares out of order")
        forwarded = self._require_graph().neighbors(sender) & self._u2
        if not set(unopened) <= forwarded:
            raise RemoteProtocolError(
                f"client {sender} reports unopened shares from clients that sent it none"
            )
        for v in unopened:
            self._unopened_by.setdefault(v, set()).add(sender)
        self._inputs[sender] = vec

    def _on_signature(self, sender: int, message: ConsistencySignature) -> None:
        signed = survivors_signed_bytes(self._session_id, tuple(sorted(self._u3)))
        signing.verify(self._registry[sender], message.signature, signed)
        self._signatures[sender] = message

    # ------------------------------------------------------------------ closing stages

    def _after_advertise(self) -> dict[int, ServerMessage]:
        u1 = frozenset(self._expected)
        self._require(len(u1), "clients advertised keys")
        adverts = tuple(self._adverts[c] for c in sorted(u1))
        self._session_id = session_id(self.config, adverts)
        self._u1_adverts = adverts
        rid = self.config.round_id
        if sparse(self.config):  # the ring waits for every member's reveal
            return {c: RevealRequest(c, rid, adverts) for c in sorted(u1)}
        return self._share_requests(self._session_id, ())

    def _after_reveal(self) -> dict[int, ServerMessage]:
        members = {a.sender for a in self._u1_adverts}
        missing = sorted(members - set(self._reveals))
        if missing:
            raise TooFewSurvivors(
                f"clients {missing[:8]} advertised keys but sent no valid ring reveal; a sparse "
                "graph is drawn from every advertiser's reveal, so the round ends here (nothing "
                "secret has been shared yet)"
            )
        rid = self.config.round_id
        reveals = tuple(RingReveal(c, rid, self._reveals[c]) for c in sorted(members))
        return self._share_requests(ring_seed(rid, self._reveals), reveals)

    def _share_requests(
        self, seed: bytes, reveals: tuple[RingReveal, ...]
    ) -> dict[int, ServerMessage]:
        adverts = self._u1_adverts
        graph = NeighborGraph(
            (a.sender for a in adverts), neighbors=self.config.neighbors, seed=seed
        )
        self._graph = graph
        self._require(len(graph.holders(adverts[0].sender)), "share holders per client")
        rid = self.config.round_id
        return {a.sender: ShareKeysRequest(a.sender, rid, adverts, reveals) for a in adverts}

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
        # A client whose sealed share did not open somewhere is out: that neighbour did not mask
        # with it and holds none of its shares.
        u3 = frozenset(self._expected) - set(self._unopened_by)
        self._u3 = u3
        self._recovery = Recovery(
            threshold=self.config.threshold,
            round_id=self.config.round_id,
            graph=self._require_graph(),
            adverts=self._adverts,
            session_id=self._session_id,
            bits=self.config.bits,
            u2=self._u2,
            u3=u3,
            unopened_by=self._unopened_by,
        )
        self._recovery.check_recoverable(u3)
        for u in sorted(u3):
            np.add(self._total, self._inputs[u], out=self._total)
        self._inputs.clear()
        rid, alive = self.config.round_id, tuple(sorted(u3))
        if self.config.mode is Mode.ACTIVE:
            return {u: ConsistencyRequest(u, rid, alive) for u in alive}
        dropped = tuple(sorted(self._u2 - u3))
        return {u: UnmaskRequest(u, rid, alive, dropped) for u in alive}

    def _after_consistency(self) -> dict[int, ServerMessage]:
        u4 = frozenset(self._expected)
        self._require(len(u4), "consistency signatures")
        self._require_recovery().check_recoverable(u4)
        rid, alive = self.config.round_id, tuple(sorted(self._u3))
        dropped = tuple(sorted(self._u2 - self._u3))
        sigs = tuple(self._signatures[u] for u in sorted(u4))
        return {u: UnmaskRequest(u, rid, alive, dropped, sigs) for u in sorted(u4)}

    def _require_graph(self) -> NeighborGraph:
        if self._graph is None:
            raise LocalProtocolError("no neighbour graph: the advertise stage has not closed")
        return self._graph

    def _require(self, count: int, what: str) -> None:
        if count < self.config.threshold:
            raise TooFewSurvivors(f"{count} {what}; the threshold is {self.config.threshold}")

    def _require_recovery(self) -> Recovery:
        if self._recovery is None:
            raise LocalProtocolError("no unmask stage: the masked-input stage has not closed")
        return self._recovery

    def _unmask(self) -> AggregateResult:
        return self._require_recovery().finish(self._total, frozenset(self._expected))
