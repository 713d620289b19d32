"""The SecAgg client: a sans-IO state machine that takes server messages and returns its answers.

Theory of operation (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017, figure 4; Bell et al., CCS 2020, section 3 for the neighbour graph). A client
u holds two X25519 key pairs, (c_u, c_u^PK) to encrypt shares and (s_u, s_u^PK) to agree mask
seeds, and a self-mask seed b_u. It

0. advertises c_u^PK, s_u^PK and a commitment to b_u (signed with its site key in ACTIVE mode);
   the commitment also binds its ring reveal r_u, a one-way function of b_u;
0b. (sparse graph only) given the advertised set U1, now fixed, reveals r_u; the neighbour ring is
   drawn from every member's reveal (:mod:`fedcore.secagg.graph` says why nobody can steer it);
1. given U1 (and, for a sparse graph, every member's reveal, each checked against its commitment),
   Shamir-shares b_u and s_u t-out-of-(k+1) among its neighbours and itself, and seals each
   neighbour's pair of shares under a key only that neighbour can derive;
2. given the shares addressed to it by the clients that reached stage 1, opens them; its view V is
   the senders whose share opened and checked. A share that does not open (garbage from the
   sender, or tampering on the way) counts as that sender dropping out for this client: it holds no
   share of that sender, does not mask with it, and names it in ``unopened`` so that the server
   leaves that pair out of the mask removal. It sends
   y_u = x_u + PRG(b_u) + sum_{v in V, u < v} PRG(s_uv) - sum_{v in V, u > v} PRG(s_uv)
   modulo 2**bits;
3. (ACTIVE mode) signs the survivor set U3 it is shown;
4. given the alive set (sent y) and the dropped set (shared keys, sent no y), reveals its share of
   b_v for each alive v and of s_v for each dropped v.

Security (semi-honest server colluding with fewer than t clients, Theorem 6.2 of Bonawitz et al.;
section 4 of Bell et al. for the sparse graph) rests on rules an honest client enforces itself,
whatever the server says: it never reveals both shares of one peer (alive and dropped must be
disjoint, and it answers one unmask request only); it refuses to unmask with fewer than t alive
share holders; it refuses duplicate keys, small-order keys (all-zero agreement), adverts bound to
another round, shares addressed to someone else or sent by a non-neighbour, and survivor sets
inconsistent with the shares it received. In ACTIVE mode it also checks each advert's Ed25519
signature against its registry of site keys and, before unmasking, t valid signatures on the same
survivor set (Bonawitz et al., section 6).

State machine: all legal transitions are in ``_TRANSITIONS``. Any exception raised while handling a
message moves the client to ``ABORTED`` for good; a message that the table does not allow in the
current state raises LocalProtocolError (the driver fed it at the wrong time).

Re-creating a client (Flower may start a fresh process for each message): every secret of a client
is drawn from the ``rng`` it is given, in a fixed order, at construction (both key pairs, b_u, and a
key from which each session's Shamir coefficients and AEAD nonces are derived). So a site that
builds the generator as ``derive_rng(site_key, context=b"secagg|" + round_id)`` gets the same
client back in any process, and :meth:`SecAggClient.rebuild` replays the server messages the client
has received so far to reach the same state. The input vector is needed only to answer the
masked-input request; a replayed masked-input request updates the state without it, so the unmask
stage runs on a client rebuilt without the vector. A site that rebuilds clients must persist, per
round id, the session id it answered (:attr:`SecAggClient.session_id`) and whether it has answered
an unmask request, and refuse to serve a second, different one: a fresh process cannot otherwise
know that a server is replaying a different history to it (forking the client).

Replay does only what later stages need. A replayed share-keys request runs every check of the live
stage and draws the same Shamir coefficients, but evaluates the polynomials at the client's own
point only and seals nothing: the sealed shares were sent once and are never sent again, and the
peer keys they were sealed under are agreed with again (and so checked again) at the masked-input
stage for every peer whose share arrives, the only peers any later answer depends on. A replayed
masked-input request opens and checks the shares it carries (the unmask answer reveals them) and
expands no mask. Every later answer of a rebuilt client is byte-identical to the original's.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedcore.crypto import aead, signing
from fedcore.crypto.agreement import AgreementKey, agree, derive_key, x25519_keypair
from fedcore.crypto.expand import add_keystreams
from fedcore.crypto.stream import CryptoRng
from fedcore.errors import (
    FedcoreError,
    InvalidMessage,
    LocalProtocolError,
    RemoteProtocolError,
)
from fedcore.secagg import rules, shamir
from fedcore.secagg.config import Mode, SessionConfig, ring_dtype
from fedcore.secagg.errors import TooFewSurvivors
from fedcore.secagg.graph import NeighborGraph, ring_reveal, ring_seed, sparse
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
    ShareValue,
    UnmaskRequest,
    UnmaskShares,
    decode_server_message,
    encode,
)
from fedcore.secagg.session import (
    advert_signed_bytes,
    decode_share_pair,
    encode_share_pair,
    pairwise_seed,
    seed_commitment,
    self_mask_key,
    session_id,
    share_associated_data,
    share_key_from_secret,
    survivors_signed_bytes,
)

# The input of the masked-input stage: the ring vector, or a function computing it after the checks.
InputVector = np.ndarray | Callable[[], np.ndarray]


class ClientState(enum.Enum):
    WAIT_ADVERTISE = "wait_advertise"
    WAIT_SHARE = "wait_share"
    WAIT_GRAPH = "wait_graph"  # revealed; waits for every member's reveal (sparse graph only)
    WAIT_MASKED_INPUT = "wait_masked_input"
    WAIT_CONSISTENCY = "wait_consistency"
    WAIT_UNMASK = "wait_unmask"
    DONE = "done"
    ABORTED = "aborted"


_S = ClientState
# The one table of legal transitions: (state, message type) -> (next state in SEMI_HONEST mode,
# next state in ACTIVE mode); None where the pair is illegal in that mode. Anything absent is
# illegal in every mode.
_TRANSITIONS: dict[tuple[ClientState, type], tuple[ClientState | None, ClientState | None]] = {
    (_S.WAIT_ADVERTISE, AdvertiseRequest): (_S.WAIT_SHARE, _S.WAIT_SHARE),
    (_S.WAIT_SHARE, ShareKeysRequest): (_S.WAIT_MASKED_INPUT, _S.WAIT_MASKED_INPUT),
    (_S.WAIT_SHARE, RevealRequest): (_S.WAIT_GRAPH, _S.WAIT_GRAPH),
    (_S.WAIT_GRAPH, ShareKeysRequest): (_S.WAIT_MASKED_INPUT, _S.WAIT_MASKED_INPUT),
    (_S.WAIT_MASKED_INPUT, MaskedInputRequest): (_S.WAIT_UNMASK, _S.WAIT_CONSISTENCY),
    (_S.WAIT_CONSISTENCY, ConsistencyRequest): (None, _S.WAIT_UNMASK),
    (_S.WAIT_UNMASK, UnmaskRequest): (_S.DONE, _S.DONE),
}
# Rows legal for one kind of graph only: True for a sparse graph (the ring is drawn by
# commit-reveal, so the share-keys request must follow the reveal), False for the complete one.
_SPARSE_ONLY: dict[tuple[ClientState, type], bool] = {
    (_S.WAIT_SHARE, RevealRequest): True,
    (_S.WAIT_GRAPH, ShareKeysRequest): True,
    (_S.WAIT_SHARE, ShareKeysRequest): False,
}


class SecAggClient:
    """One site's side of one SecAgg round.

    ``rng``: the source of every secret (OS-keyed CryptoRng by default; see the module docstring
    for re-creating a client). ``signing_key``: the site's Ed25519 seed, and ``registry``: every
    site's Ed25519 public key by client id; both are required in ACTIVE mode only.
    """

    def __init__(
        self,
        client_id: int,
        *,
        rng: CryptoRng | None = None,
        signing_key: bytes | None = None,
        registry: Mapping[int, bytes] | None = None,
    ) -> None:
        rng = rng if rng is not None else CryptoRng()
        self.client_id = client_id
        self._state = ClientState.WAIT_ADVERTISE
        self._signing_key = signing_key
        self._registry = dict(registry) if registry is not None else None
        # The draw order is part of the re-creation contract: never reorder these four lines.
        self._enc_private, self._enc_public = x25519_keypair(rng)
        self._mask_private, self._mask_public = x25519_keypair(rng)
        self._seed = rng.bytes(32)
        self._coin_key = rng.bytes(32)
        self._enc_key = AgreementKey(self._enc_private)
        self._mask_key = AgreementKey(self._mask_private)
        self._config: SessionConfig | None = None
        self._advert: KeyAdvert | None = None
        self._adverts: dict[int, KeyAdvert] = {}
        self._session_id: bytes | None = None
        self._graph: NeighborGraph | None = None
        self._own_shares: tuple[int, int] = (0, 0)
        self._received: dict[int, tuple[int, int]] = {}  # sender -> (seed share, key share)
        self._unopened: frozenset[int] = frozenset()  # senders whose sealed share did not open
        # neighbour -> agree(c_u, c_v^PK), kept from a live share-keys stage for the next stage
        self._enc_secrets: dict[int, bytes] = {}
        self._survivors: tuple[int, ...] | None = None
        self._error: FedcoreError | None = None

    # ------------------------------------------------------------------ public surface

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def session_id(self) -> bytes | None:
        """The session id once the advert set is fixed: at the reveal stage of a sparse graph,
        else when key shares are sent (persist it to refuse a forked session)."""
        return self._session_id

    @property
    def error(self) -> FedcoreError | None:
        """The error that aborted the client, if any."""
        return self._error

    def receive(self, message: ServerMessage, *, vector: InputVector | None = None) -> ClientMessage:
        """Handle one server message and return the answer to send.

        ``vector`` (unsigned integers below 2**bits, of the session's length) is required with a
        MaskedInputRequest and refused with anything else; it may be a function that returns the
        vector, called only after the request passed every check (a site trains only then). Raises LocalProtocolError when the
        message is not legal in the current state, RemoteProtocolError / InvalidMessage /
        TooFewSurvivors when the message breaks a protocol rule; on any exception the client is
        left ``ABORTED``.
        """
        answer = self._step(message, vector=vector, replay=False)
        if answer is None:  # pragma: no cover - only replay returns None
            raise LocalProtocolError("no answer produced")
        return answer

    def receive_bytes(self, data: bytes, *, vector: np.ndarray | None = None) -> bytes:
        """Parse, handle and serialise: :meth:`receive` on the wire format."""
        try:
            message = decode_server_message(data)
        except FedcoreError as exc:
            self._abort(exc)
            raise
        return encode(self.receive(message, vector=vector))

    @classmethod
    def rebuild(
        cls,
        client_id: int,
        history: Sequence[ServerMessage],
        *,
        rng: CryptoRng,
        signing_key: bytes | None = None,
        registry: Mapping[int, bytes] | None = None,
    ) -> SecAggClient:
        """Re-create a client from the generator it was built with and the server messages it has
        received, in order. A MaskedInputRequest is replayed without an input vector; replaying an
        UnmaskRequest is refused (LocalProtocolError), since answering it twice is what the
        one-unmask rule forbids. Raises what :meth:`receive` raises if the history is not legal.
        """
        client = cls(client_id, rng=rng, signing_key=signing_key, registry=registry)
        for message in history:
            if isinstance(message, UnmaskRequest):
                raise LocalProtocolError("an unmask request is answered once and never replayed")
            client._step(message, vector=None, replay=True)
        return client

    def abort(self, reason: str = "aborted by the caller") -> None:
        """Move to ABORTED (for example when the site gives up on the round)."""
        self._abort(LocalProtocolError(reason))

    # ------------------------------------------------------------------ dispatch

    def _step(
        self, message: ServerMessage, *, vector: InputVector | None, replay: bool
    ) -> ClientMessage | None:
        try:
            next_state = self._next_state(message)
            if vector is not None and not isinstance(message, MaskedInputRequest):
                raise LocalProtocolError(
                    "an input vector goes with a MaskedInputRequest only, "
                    f"not with a {type(message).__name__}"
                )
            answer: ClientMessage | None
            if isinstance(message, AdvertiseRequest):
                answer = self._on_advertise(message)
            elif isinstance(message, RevealRequest):
                answer = self._on_reveal(message)
            elif isinstance(message, ShareKeysRequest):
                answer = self._on_share_keys(message, replay=replay)
            elif isinstance(message, MaskedInputRequest):
                answer = self._on_masked_input(message, vector, replay=replay)
            elif isinstance(message, ConsistencyRequest):
                answer = self._on_consistency(message)
            else:
                answer = self._on_unmask(message)
        except FedcoreError as exc:
            self._abort(exc)
            raise
        except Exception as exc:  # a bug or a malformed record built in memory: still typed
            error = RemoteProtocolError(f"client {self.client_id} failed: {exc!r}")
            self._abort(error)
            raise error from exc
        self._state = next_state
        return answer

    def _next_state(self, message: ServerMessage) -> ClientState:
        row = _TRANSITIONS.get((self._state, type(message)))
        mode = (
            message.config.mode
            if isinstance(message, AdvertiseRequest)
            else (self._config.mode if self._config is not None else Mode.SEMI_HONEST)
        )
        target = None if row is None else row[0 if mode is Mode.SEMI_HONEST else 1]
        graph_kind = _SPARSE_ONLY.get((self._state, type(message)))
        if graph_kind is not None and self._config is not None:
            if sparse(self._config) is not graph_kind:
                target = None
        if target is None:
            graph = (
                ""
                if self._config is None
                else (", sparse graph" if sparse(self._config) else ", complete graph")
            )
            raise LocalProtocolError(
                f"client in state {self._state.value} cannot take a {type(message).__name__}"
                f" ({mode.name} mode{graph})"
            )
        return target

    def _abort(self, error: FedcoreError) -> None:
        self._state = ClientState.ABORTED
        if self._error is None:
            self._error = error

    # ------------------------------------------------------------------ checks shared by stages

    def _check_addressing(self, recipient: int, round_id: bytes) -> SessionConfig:
        if recipient != self.client_id:
            raise RemoteProtocolError(
                f"message addressed to client {recipient} arrived at client {self.client_id}"
            )
        config = self._config
        if config is None:  # unreachable through the table; kept for the type checker
            raise LocalProtocolError("no session config yet")
        if round_id != config.round_id:
            raise RemoteProtocolError(
                f"message bound to round {round_id.hex()}, expected {config.round_id.hex()}"
            )
        return config

    def _session(self) -> tuple[NeighborGraph, bytes]:
        """The graph and session id fixed at stage 1 (the transition table guarantees them)."""
        if self._graph is None or self._session_id is None:
            raise LocalProtocolError("no session yet: the share-keys stage has not run")
        return self._graph, self._session_id

    def _active_keys(self) -> tuple[bytes, dict[int, bytes]]:
        """The site's signing key and the registry (checked present at stage 0 in ACTIVE mode)."""
        if self._signing_key is None or self._registry is None:
            raise LocalProtocolError(
                "ACTIVE mode needs the site's signing key and the key registry"
            )
        return self._signing_key, self._registry

    def _ids(self, ids: tuple[int, ...], what: str) -> frozenset[int]:
        if list(ids) != sorted(set(ids)):
            raise RemoteProtocolError(f"{what} must be sorted and distinct")
        graph, _ = self._session()
        unknown = [i for i in ids if i not in graph]
        if unknown:
            raise RemoteProtocolError(f"{what} names clients outside the session: {unknown[:5]}")
        return frozenset(ids)

    # ------------------------------------------------------------------ stage 0: advertise keys

    def _on_advertise(self, message: AdvertiseRequest) -> KeyAdvert:
        config = message.config
        if message.recipient != self.client_id:
            raise RemoteProtocolError(
                f"advertise request for client {message.recipient} arrived at {self.client_id}"
            )
        if self.client_id not in config.clients:
            raise RemoteProtocolError(f"client {self.client_id} is not invited to this round")
        if config.mode is Mode.ACTIVE:
            self._active_keys()  # raises LocalProtocolError when the keys are missing
        commitment = seed_commitment(
            config.round_id,
            self.client_id,
            ring_reveal(config.round_id, self.client_id, self._seed),
        )
        advert = KeyAdvert(
            self.client_id, config.round_id, self._enc_public, self._mask_public, commitment
        )
        if config.mode is Mode.ACTIVE:
            signature = signing.sign(self._active_keys()[0], advert_signed_bytes(advert))
            advert = dataclasses.replace(advert, signature=signature)
        self._config = config
        self._advert = advert
        return advert

    # ------------------------------------------------------------------ stage 0b: reveal

    def _on_reveal(self, message: RevealRequest) -> RingReveal:
        config = self._check_addressing(message.recipient, message.round_id)
        adverts = rules.checked_adverts(
            message.adverts, config=config, own=self._advert, registry=self._registry
        )
        self._adverts = adverts
        self._session_id = session_id(config, adverts.values())
        reveal = ring_reveal(config.round_id, self.client_id, self._seed)
        return RingReveal(self.client_id, config.round_id, reveal)

    # ------------------------------------------------------------------ stage 1: share keys

    def _on_share_keys(self, message: ShareKeysRequest, *, replay: bool) -> EncryptedShares | None:
        config = self._check_addressing(message.recipient, message.round_id)
        if sparse(config):
            # U1 was fixed, and every advert checked, at the reveal stage: the same set or nothing
            adverts = self._adverts
            if message.adverts != tuple(adverts.values()):
                raise RemoteProtocolError("the advert set changed after the reveal stage")
            sid = self._session_id
            if sid is None:  # unreachable through the table; kept for the type checker
                raise LocalProtocolError("no session: the reveal stage has not run")
            reveals = rules.checked_reveals(
                message.reveals, adverts=adverts, round_id=config.round_id
            )
            seed = ring_seed(config.round_id, reveals)
        else:
            adverts = rules.checked_adverts(
                message.adverts, config=config, own=self._advert, registry=self._registry
            )
            sid = seed = session_id(config, adverts.values())
            if message.reveals:
                raise RemoteProtocolError("ring reveals sent for a complete graph")
        graph = NeighborGraph(adverts, neighbors=config.neighbors, seed=seed)
        holders = sorted(graph.holders(self.client_id))
        if len(holders) < config.threshold:
            raise TooFewSurvivors(
                f"{len(holders)} share holders for client {self.client_id}, "
                f"threshold is {config.threshold}"
            )
        session_rng = CryptoRng(
            derive_key(self._coin_key, salt=sid, info=b"fedcore/secagg/v1/coins")
        )
        secrets = [self._seed, self._mask_private]
        if replay:  # the sealed shares are never re-sent: keep only this client's own shares
            own_seed, own_key = shamir.share_of(
                secrets,
                holders=holders,
                threshold=config.threshold,
                rng=session_rng,
                holder=self.client_id,
            )
            self._adverts, self._session_id, self._graph = adverts, sid, graph
            self._own_shares = (own_seed, own_key)
            return None
        seed_shares, key_shares = shamir.split(
            secrets, holders=holders, threshold=config.threshold, rng=session_rng
        )
        sealed = []
        enc_secrets: dict[int, bytes] = {}
        for v in holders:
            if v == self.client_id:
                continue
            enc_secrets[v] = agree(self._enc_key, adverts[v].enc_public)
            key = share_key_from_secret(enc_secrets[v], sid, self.client_id, v)
            plaintext = encode_share_pair(self.client_id, v, seed_shares[v], key_shares[v])
            ciphertext = aead.seal(
                key,
                plaintext,
                associated_data=share_associated_data(sid, self.client_id, v),
                rng=session_rng,
            )
            sealed.append(EncryptedShare(self.client_id, v, ciphertext))
        self._adverts = adverts
        self._session_id = sid
        self._graph = graph
        self._own_shares = (seed_shares[self.client_id], key_shares[self.client_id])
        self._enc_secrets = enc_secrets
        return EncryptedShares(self.client_id, config.round_id, tuple(sealed))

    # ------------------------------------------------------------------ stage 2: masked input

    def _on_masked_input(
        self, message: MaskedInputRequest, vector: InputVector | None, *, replay: bool
    ) -> MaskedInput | None:
        config = self._check_addressing(message.recipient, message.round_id)
        graph, sid = self._session()
        neighbors = graph.neighbors(self.client_id)
        received: dict[int, tuple[int, int]] = {}
        unopened: set[int] = set()
        for share in message.shares:
            if share.receiver != self.client_id:
                raise RemoteProtocolError(
                    f"share from {share.sender} is addressed to {share.receiver}, "
                    f"not to {self.client_id}"
                )
            if share.sender not in neighbors:
                raise RemoteProtocolError(f"share from client {share.sender}, not a neighbour")
            if share.sender in received or share.sender in unopened:
                raise RemoteProtocolError(f"two shares from client {share.sender}")
            try:
                received[share.sender] = self._open_share(share, sid)
            except InvalidMessage:
                unopened.add(share.sender)  # that sender counts as dropped for this client
        if len(received) + 1 < config.threshold:
            raise TooFewSurvivors(
                f"client {self.client_id} holds shares from {len(received)} neighbours plus "
                f"itself, threshold is {config.threshold}"
            )
        if replay:
            if vector is not None:  # pragma: no cover - rebuild never passes one
                raise LocalProtocolError("replay takes no vector")
            self._received, self._unopened = received, frozenset(unopened)
            return None
        if vector is None:
            raise LocalProtocolError("a MaskedInputRequest needs the input vector")
        if callable(vector):  # a site computes its input only now, after every check above
            vector = vector()
        y = rules.ring_input(vector, config)
        adds: list[bytes] = [self_mask_key(self._seed, sid)]
        subtracts: list[bytes] = []
        for v in sorted(received):
            seed = pairwise_seed(
                self._mask_key, self._adverts[v].mask_public, sid, self.client_id, v
            )
            (subtracts if self.client_id > v else adds).append(seed)
        add_keystreams(y, adds=adds, subtracts=subtracts)  # one pass over y for all the masks
        if config.bits not in (32, 64):
            y &= ring_dtype(config.bits)((1 << config.bits) - 1)
        self._received, self._unopened = received, frozenset(unopened)
        y.flags.writeable = False
        return MaskedInput(self.client_id, config.round_id, config.bits, y, tuple(sorted(unopened)))

    def _open_share(self, share: EncryptedShare, sid: bytes) -> tuple[int, int]:
        """The (seed share, key share) sealed in ``share``; InvalidMessage when it does not open
        or holds something else (the sender's fault, or the carrier's: either way unusable)."""
        shared = self._enc_secrets.get(share.sender)
        if shared is None:  # a rebuilt client: its replayed share-keys stage agreed nothing
            shared = agree(self._enc_key, self._adverts[share.sender].enc_public)
        key = share_key_from_secret(shared, sid, share.sender, self.client_id)
        plaintext = aead.open_sealed(
            key,
            share.ciphertext,
            associated_data=share_associated_data(sid, share.sender, self.client_id),
        )
        sender, receiver, seed_share, key_share = decode_share_pair(plaintext)
        if (sender, receiver) != (share.sender, self.client_id):
            raise InvalidMessage(f"sealed share of client {share.sender} names another pair")
        if seed_share >= shamir.PRIME or key_share >= shamir.PRIME:
            raise InvalidMessage(f"share from client {sender} is not a field element")
        return seed_share, key_share

    # ------------------------------------------------------------------ stage 3: consistency

    def _on_consistency(self, message: ConsistencyRequest) -> ConsistencySignature:
        config = self._check_addressing(message.recipient, message.round_id)
        survivors = self._ids(message.survivors, "survivor set")
        self._check_survivors(survivors, config)
        _, sid = self._session()
        signature = signing.sign(
            self._active_keys()[0], survivors_signed_bytes(sid, message.survivors)
        )
        self._survivors = message.survivors
        return ConsistencySignature(self.client_id, config.round_id, signature)

    def _check_survivors(self, alive: frozenset[int], config: SessionConfig) -> None:
        graph, _ = self._session()
        rules.check_survivors(
            alive,
            me=self.client_id,
            graph=graph,
            seen=frozenset(self._received),
            threshold=config.threshold,
        )

    # ------------------------------------------------------------------ stage 4: unmask

    def _on_unmask(self, message: UnmaskRequest) -> UnmaskShares:
        config = self._check_addressing(message.recipient, message.round_id)
        alive = self._ids(message.alive, "alive set")
        dropped = self._ids(message.dropped, "dropped set")
        graph, sid = self._session()
        seen = frozenset(self._received)
        rules.check_unmask_sets(
            alive,
            dropped,
            me=self.client_id,
            graph=graph,
            seen=seen | self._unopened,
            unopened=self._unopened,
        )
        self._check_survivors(alive, config)
        if config.mode is Mode.ACTIVE:
            rules.check_consistency_signatures(
                message.signatures,
                alive=message.alive,
                signed_by_me=self._survivors,
                signed_bytes=survivors_signed_bytes(sid, message.alive),
                registry=self._active_keys()[1],
                threshold=config.threshold,
            )
        seed_shares = [ShareValue(self.client_id, self._own_shares[0])]
        seed_shares += [ShareValue(v, self._received[v][0]) for v in sorted(alive & seen)]
        key_shares = [ShareValue(v, self._received[v][1]) for v in sorted(dropped & seen)]
        seed_shares.sort(key=lambda s: s.owner)
        return UnmaskShares(self.client_id, config.round_id, tuple(seed_shares), tuple(key_shares))
