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

Floors. A client refuses a round weaker than its :class:`~fedcore.secagg.floors.Floors` (by default
the protocol's safe rules; only an explicit ``allow_unsafe`` drops them), held against the sites
that actually take part before each thing it releases (:mod:`fedcore.secagg.floors` says where).

State machine: all legal transitions are in one table (:mod:`fedcore.secagg.state`). Any exception
raised while handling a message moves the client to ``ABORTED`` for good; a message that the table
does not allow in the current state raises LocalProtocolError (the driver fed it at the wrong time).

Re-creating a client: every secret is drawn from the ``rng`` the client is given, in a fixed
order (:mod:`fedcore.secagg.client_keys` states the contract and what a site must persist);
:meth:`SecAggClient.rebuild` replays the server messages received so far. The input vector is
needed only to answer the masked-input request; a replayed masked-input request updates the state
without it, so the unmask stage runs on a client rebuilt without the vector.

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
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedcore.crypto import signing
from fedcore.crypto.agreement import agree
from fedcore.crypto.stream import CryptoRng
from fedcore.errors import FedcoreError, LocalProtocolError, RemoteProtocolError
from fedcore.secagg import rules, shamir
from fedcore.secagg.client_keys import ClientKeys
from fedcore.secagg.config import Mode, SessionConfig
from fedcore.secagg.errors import TooFewSurvivors
from fedcore.secagg.floors import Floors
from fedcore.secagg.graph import NeighborGraph, ring_reveal, ring_seed, sparse
from fedcore.secagg.masking import mask_input
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
    UnmaskShares,
    decode_server_message,
    encode,
)
from fedcore.secagg.sealing import open_share, opened_shares, seal_shares
from fedcore.secagg.session import (
    advert_signed_bytes,
    seed_commitment,
    session_id,
)
from fedcore.secagg.state import ClientState, client_next_state
from fedcore.secagg.survivors import Holdings, sign_survivors, unmask_answer

__all__ = ["ClientState", "InputVector", "SecAggClient"]

# The input of the masked-input stage: the ring vector, or a function computing it after the checks.
InputVector = np.ndarray | Callable[[], np.ndarray]


class SecAggClient:
    """One site's side of one SecAgg round.

    ``rng``: the source of every secret (OS-keyed CryptoRng by default; see the module docstring
    for re-creating a client). ``signing_key``: the site's Ed25519 seed, and ``registry``: every
    site's Ed25519 public key by client id; both are required in ACTIVE mode only. ``floors``:
    the weakest round this client joins (default :class:`Floors`: the protocol's safe rules);
    ``allow_unsafe``: drop the safe rules, keeping the floors' own minimums (experiments only).
    """

    def __init__(
        self,
        client_id: int,
        *,
        rng: CryptoRng | None = None,
        signing_key: bytes | None = None,
        registry: Mapping[int, bytes] | None = None,
        floors: Floors | None = None,
        allow_unsafe: bool = False,
    ) -> None:
        rng = rng if rng is not None else CryptoRng()
        self.client_id = client_id
        floors = floors if floors is not None else Floors()
        self._floors = dataclasses.replace(floors, safe_rules=False) if allow_unsafe else floors
        self._state = ClientState.WAIT_ADVERTISE
        self._signing_key = signing_key
        self._registry = dict(registry) if registry is not None else None
        self._keys = ClientKeys(rng)
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
    def floors(self) -> Floors:
        """The weakest round this client joins (held at every stage; see the module docstring)."""
        return self._floors

    @property
    def error(self) -> FedcoreError | None:
        """The error that aborted the client, if any."""
        return self._error

    def receive(
        self, message: ServerMessage, *, vector: InputVector | None = None
    ) -> ClientMessage:
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
        floors: Floors | None = None,
        allow_unsafe: bool = False,
    ) -> SecAggClient:
        """Re-create a client from the generator it was built with and the server messages it has
        received, in order. A MaskedInputRequest is replayed without an input vector; replaying an
        UnmaskRequest is refused (LocalProtocolError), since answering it twice is what the
        one-unmask rule forbids. Raises what :meth:`receive` raises if the history is not legal.
        """
        client = cls(
            client_id,
            rng=rng,
            signing_key=signing_key,
            registry=registry,
            floors=floors,
            allow_unsafe=allow_unsafe,
        )
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
            next_state = client_next_state(self._state, message, self._config)
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

    # ------------------------------------------------------------------ stage 0: advertise keys

    def _on_advertise(self, message: AdvertiseRequest) -> KeyAdvert:
        config = message.config
        if message.recipient != self.client_id:
            raise RemoteProtocolError(
                f"advertise request for client {message.recipient} arrived at {self.client_id}"
            )
        if self.client_id not in config.clients:
            raise RemoteProtocolError(f"client {self.client_id} is not invited to this round")
        self._floors.check(config)  # a weaker offer is refused before anything is drawn or sent
        if config.mode is Mode.ACTIVE:
            self._active_keys()  # raises LocalProtocolError when the keys are missing
        commitment = seed_commitment(
            config.round_id,
            self.client_id,
            ring_reveal(config.round_id, self.client_id, self._keys.seed),
        )
        advert = KeyAdvert(
            self.client_id,
            config.round_id,
            self._keys.enc_public,
            self._keys.mask_public,
            commitment,
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
        self._floors.check_joined(config, adverts)
        self._adverts = adverts
        self._session_id = session_id(config, adverts.values())
        reveal = ring_reveal(config.round_id, self.client_id, self._keys.seed)
        return RingReveal(self.client_id, config.round_id, reveal)

    # ------------------------------------------------------------------ stage 1: share keys

    def _on_share_keys(self, message: ShareKeysRequest, *, replay: bool) -> EncryptedShares | None:
        config = self._check_addressing(message.recipient, message.round_id)
        adverts, sid, graph = self._share_session(message, config)
        holders = sorted(graph.holders(self.client_id))
        if len(holders) < config.threshold:
            raise TooFewSurvivors(
                f"{len(holders)} share holders for client {self.client_id}, "
                f"threshold is {config.threshold}"
            )
        session_rng = self._keys.coins(sid)
        secrets = [self._keys.seed, self._keys.mask_private]
        self._adverts, self._session_id, self._graph = adverts, sid, graph
        if replay:  # the sealed shares are never re-sent: keep only this client's own shares
            own_seed, own_key = shamir.share_of(
                secrets,
                holders=holders,
                threshold=config.threshold,
                rng=session_rng,
                holder=self.client_id,
            )
            self._own_shares = (own_seed, own_key)
            return None
        seed_shares, key_shares = shamir.split(
            secrets, holders=holders, threshold=config.threshold, rng=session_rng
        )
        sealed, self._enc_secrets = seal_shares(
            me=self.client_id,
            holders=holders,
            seed_shares=seed_shares,
            key_shares=key_shares,
            enc_key=self._keys.enc,
            adverts=adverts,
            sid=sid,
            rng=session_rng,
        )
        self._own_shares = (seed_shares[self.client_id], key_shares[self.client_id])
        return EncryptedShares(self.client_id, config.round_id, sealed)

    def _share_session(
        self, message: ShareKeysRequest, config: SessionConfig
    ) -> tuple[dict[int, KeyAdvert], bytes, NeighborGraph]:
        """U1 (checked, and held against the floors), the session id and the neighbour graph."""
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
        self._floors.check_joined(config, adverts)
        return adverts, sid, NeighborGraph(adverts, neighbors=config.neighbors, seed=seed)

    # ------------------------------------------------------------------ stage 2: masked input

    def _on_masked_input(
        self, message: MaskedInputRequest, vector: InputVector | None, *, replay: bool
    ) -> MaskedInput | None:
        config = self._check_addressing(message.recipient, message.round_id)
        graph, sid = self._session()
        neighbors = graph.neighbors(self.client_id)
        received, unopened = opened_shares(
            message.shares,
            me=self.client_id,
            neighbors=neighbors,
            open_one=lambda share: self._open_share(share, sid),
        )
        if len(received) + 1 < config.threshold:
            raise TooFewSurvivors(
                f"client {self.client_id} holds shares from {len(received)} neighbours plus "
                f"itself, threshold is {config.threshold}"
            )
        if config.complete or config.neighbors >= len(self._adverts) - 1:  # U2 is visible here
            self._floors.check_participants(
                len(received) + 1, what="sites sent this site shares that opened"
            )
        if replay:
            if vector is not None:  # pragma: no cover - rebuild never passes one
                raise LocalProtocolError("replay takes no vector")
            self._received, self._unopened = received, unopened
            return None
        if vector is None:
            raise LocalProtocolError("a MaskedInputRequest needs the input vector")
        if callable(vector):  # a site computes its input only now, after every check above
            vector = vector()
        y = mask_input(
            rules.ring_input(vector, config),
            me=self.client_id,
            bits=config.bits,
            seed=self._keys.seed,
            mask_key=self._keys.mask,
            peers=received,
            adverts=self._adverts,
            sid=sid,
        )
        self._received, self._unopened = received, unopened
        return MaskedInput(self.client_id, config.round_id, config.bits, y, tuple(sorted(unopened)))

    def _open_share(self, share: EncryptedShare, sid: bytes) -> tuple[int, int]:
        """The (seed share, key share) sealed in ``share``; InvalidMessage when unusable."""
        shared = self._enc_secrets.get(share.sender)
        if shared is None:  # a rebuilt client: its replayed share-keys stage agreed nothing
            shared = agree(self._keys.enc, self._adverts[share.sender].enc_public)
        return open_share(share, me=self.client_id, shared=shared, sid=sid)

    # ------------------------------------------------------------------ stages 3 and 4

    def _holdings(self, config: SessionConfig) -> Holdings:
        graph, sid = self._session()
        return Holdings(
            self.client_id, config, graph, sid, self._own_shares, self._received, self._unopened
        )

    def _on_consistency(self, message: ConsistencyRequest) -> ConsistencySignature:
        config = self._check_addressing(message.recipient, message.round_id)
        answer = sign_survivors(
            message,
            self._holdings(config),
            floors=self._floors,
            signing_key=self._active_keys()[0],
        )
        self._survivors = message.survivors
        return answer

    def _on_unmask(self, message: UnmaskRequest) -> UnmaskShares:
        config = self._check_addressing(message.recipient, message.round_id)
        active = config.mode is Mode.ACTIVE
        return unmask_answer(
            message,
            self._holdings(config),
            floors=self._floors,
            signed_by_me=self._survivors,
            registry=self._active_keys()[1] if active else None,
        )
