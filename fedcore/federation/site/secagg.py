"""A site's side of secure aggregation inside a Flower round.

Theory of operation. The protocol itself is :class:`fedcore.secagg.SecAggClient` (Bonawitz et al.,
CCS 2017; Bell et al., CCS 2020). This module runs one stage of it per Flower message, and solves
the problems Flower adds: a ClientApp may be a fresh process for every message (always in
deployment), Flower's ``context.state`` lives for one run only (a SuperNode restart loses it), and
the server writes the run config. So nothing secret lives in memory from one stage to the next or
in ``context.state``, and nothing the site's safety rests on comes from the run config:

- The site's files live in its :class:`~fedcore.federation.site.store.SiteStore` (the node config's
  ``state-dir``; in simulation only, ``<run record>/sites``): a *site key* (32 random bytes, mode
  0600, refused if it is a link, another user's, or readable by others) and the *round journal*
  (:mod:`fedcore.federation.site.journal`), written and fsynced before each answer leaves.
- Every secret of a round (both X25519 key pairs, the self-mask seed, the share coins) is drawn
  from ``derive_rng(site_key, "secagg|" + round_id + "|" + nonce)`` in a fixed order, where
  ``nonce`` is fresh CSPRNG output the journal stores for that round id; any process of the site
  re-creates the same client for the round, and a server that replays a round id gets nothing back:
  the journal refuses a round id it already holds.
- ``context.state`` keeps only public data: the round id, the server messages received in the round
  (they travelled in the clear) and the session id the site answered. Each stage rebuilds the client
  by replaying that transcript (:meth:`~fedcore.secagg.SecAggClient.rebuild`), answers, appends.
- The journal holds, per round id, the one session the site serves, and whether the masked input,
  the survivor signature and the unmask answer left (each at most once, ever); with the unmask
  answer, whose seed shares and whose key shares were revealed (never both for one peer).
- Every parameter that changes what the site sends (participants, threshold, graph, mode, ring,
  clip range, weight budget, DP clip norm) comes from the session config in the advertise request,
  which the session id hashes; the request record carries only the stage and its payload.
- Before joining, the site checks the offer against its floors (:mod:`fedcore.secagg.floors`): the
  protocol's safe rules and the node config's ``secagg-mode``, ``secagg-min-threshold``,
  ``secagg-min-neighbors`` and ``secagg-min-participants`` (:func:`site_floors`).
- Validate, then work (:func:`_check_input`): at the masked-input stage the transcript, the
  journal, the session, and every parameter that could make the site refuse after training (the
  session's vector length against the model, the ring against the DP clip norm, the weight budget)
  are checked before the site trains (and, with record-level DP, charges its ledger); the journal
  then records ``trained`` durably, so a site trains and charges at most once per round id.
- Whether a site answers never depends on its data: its weight is capped to the session's
  per-site share ``max_total_weight // n`` (never refused, the cap logged at the site), and its
  update is clipped to the session's range.
- An error text may travel back to the server: nothing data-dependent goes into it (the site's
  weight, norms, training errors are logged here, and the reply says only what kind of step failed).

In ACTIVE mode the site also signs with an Ed25519 key derived from the same site key, publishes
its public half in the registry folder (:mod:`fedcore.federation.site.registry`) when asked to
enrol and before advertising, and checks every signature against that folder.

At the masked-input stage the site trains (the wrapped train handler), forms its update (new
weights minus global weights, flattened in the global record's key order), and encodes weight x
update together with the weight (:func:`fedcore.secagg.encode_update`), so the server can form the
exact weighted mean from the sum alone. With site-level DP at the server, the session carries the
L2 clip norm: the site clips before masking and weighs 1 (:mod:`fedcore.mechanisms.central_on_secagg`).
Under distributed DP the session binds the noise too: the site recomputes the round's privacy
event, declines before training when its own ledger cannot afford it, and charges it before the
noised vector is masked (:class:`~fedcore.mechanisms.distributed.SiteHalf`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedcore.crypto import CryptoRng
from fedcore.crypto.agreement import derive_rng
from fedcore.errors import ConfigError, FedcoreError, LocalProtocolError, RemoteProtocolError
from fedcore.federation.site import registry as secagg_registry
from fedcore.federation.site.abandoned import AbandonLimits
from fedcore.federation.site.decoded import decoded as _decoded
from fedcore.federation.site.folders import node_int
from fedcore.federation.site.journal import RoundEntry, RoundJournal, check_session
from fedcore.federation.site.store import SiteStore
from fedcore.mechanisms.central_on_secagg import (
    SiteClipping,
    encode_clipped_update,
    ring_clip_norm,
    session_length,
)
from fedcore.mechanisms.distributed import DistributedDP, SiteHalf
from fedcore.secagg import (
    EncodingConfig,
    SecAggClient,
    encode,
    encode_update,
)
from fedcore.secagg.config import Mode, SessionConfig
from fedcore.secagg.floors import Floors
from fedcore.secagg.messages import (
    AdvertiseRequest,
    ConsistencyRequest,
    MaskedInputRequest,
    RevealRequest,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskShares,
)

SECAGG = "secagg"  # the record that carries a protocol stage, in requests and replies
ENROL = "enrol"  # ACTIVE mode: publish the site's signing key in the registry
KEY_BYTES = 32

# The node config's floors (the operator's, never the run config's).
NODE_MODE = "secagg-mode"
NODE_MIN_THRESHOLD = "secagg-min-threshold"
NODE_MIN_NEIGHBORS = "secagg-min-neighbors"
NODE_MIN_PARTICIPANTS = "secagg-min-participants"

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrainedUpdate:
    """What the wrapped train handler produced: the flat update and the site's integer weight."""

    update: np.ndarray
    weight: int


def flat_update(new: ArrayRecord, old: ArrayRecord) -> np.ndarray:
    """``new - old`` over every array, flattened in ``old``'s key order (float64)."""
    return np.concatenate(
        [
            (new[k].numpy().astype(np.float64) - old[k].numpy().astype(np.float64)).ravel()
            for k in old.keys()
        ]
    )


def request_record(*, stage: str, payload: bytes) -> ConfigRecord:
    """A stage request: the stage name and the wire payload, nothing else (every parameter of the
    round travels inside the session config, which the session id hashes)."""
    return ConfigRecord({"stage": stage, "payload": payload})


def site_floors(node_config: Mapping[str, Any], *, allow_unsafe: bool = False) -> Floors:
    """The floors of this site, from the operator's node config (see :mod:`fedcore.secagg.floors`).

    ``allow_unsafe`` drops the protocol's safe rules (the node config's own floors still hold); the
    caller passes it only in simulation, where the run config's ``secagg.allow_unsafe`` is the
    same person's choice. Raises ConfigError naming a bad node-config value.
    """
    mode_name = node_config.get(NODE_MODE, "semi-honest")
    modes = {"semi-honest": Mode.SEMI_HONEST, "active": Mode.ACTIVE}
    if mode_name not in modes:
        raise ConfigError(
            f"node config {NODE_MODE!r} must be 'semi-honest' or 'active', got {mode_name!r}"
        )

    return Floors(
        mode=modes[mode_name],
        min_threshold=node_int(node_config, NODE_MIN_THRESHOLD, 2, least=2),
        min_neighbors=node_int(node_config, NODE_MIN_NEIGHBORS, 0, least=0),
        min_clients=node_int(node_config, NODE_MIN_PARTICIPANTS, 2, least=2),
        safe_rules=not allow_unsafe,
    )


@dataclass(frozen=True, slots=True)
class SiteParty:
    """What makes a site a party of its own: its node id, its files (key and round journal), the
    registry folder of signing keys (ACTIVE mode), the weakest offer it accepts, and its identity
    (the federation CA and its certificate; ACTIVE mode, without it ACTIVE rounds are refused)."""

    client_id: int
    store: SiteStore
    registry: Path
    floors: Floors
    identity: secagg_registry.SiteIdentity | None = None
    run_id: str | None = None  # the Flower run, for the abandoned-round bound per run
    abandon: AbandonLimits | None = None  # None: no bound (the library's own tests)
    distributed: DistributedDP | None = None  # its distributed-DP budget; None: refuses such rounds


class Trainer(Protocol):
    """The site's local training, called at the masked-input stage only, after every check."""

    def size(self) -> int:
        """The number of model parameters the update will have (read before training)."""
        ...

    def __call__(self) -> TrainedUpdate: ...


def answer_stage(
    request: ConfigRecord, *, party: SiteParty, state: RecordDict, train: Trainer
) -> bytes:
    """Answer one protocol stage for ``party``; return the reply payload (wire bytes).

    ``state``: the node's Flower ``context.state``; only public data is written to it. ``train``
    runs at the masked-input stage only, after every check of the request (:func:`_check_input`).

    Raises RemoteProtocolError / InvalidMessage for a request that breaks the protocol or offers
    less than the floors, LocalProtocolError for a request the journal refuses (a replayed round
    id, a second session, a second answer of a once-only kind), ConfigError /
    CorruptJournalError for a site whose files are not usable. A request refused before its round
    began (a weaker offer, a replayed round id) leaves the journal unchanged; once begun, a round id
    stays used even if the round then fails. An accepted answer is journaled before this returns
    (fsynced for the masked input, the survivor signature and the unmask answer).
    """
    if request.get("stage") == ENROL:
        key, _ = RoundJournal.open_site(party.store)
        # The reply echoes the public key for the record; the server trusts only the folder.
        return _publish(party.registry, party.client_id, key, party.identity)
    payload = request.get("payload")
    if not isinstance(payload, bytes):
        raise RemoteProtocolError("a secagg request needs a bytes 'payload'")
    message = _decoded(payload)
    key, journal = RoundJournal.open_site(party.store)
    transcript, config, entry = _open_round(message, journal, key, state=state, party=party)
    active = config.mode is Mode.ACTIVE
    client = SecAggClient.rebuild(
        party.client_id,
        transcript.messages(),
        rng=derive_rng(key, context=b"secagg|" + config.round_id + b"|" + entry.nonce),
        signing_key=secagg_registry.signing_seed(key) if active else None,
        registry=_certified(party.registry, party.identity) if active else None,
        floors=party.floors,  # held by the client at every stage, against the sites taking part
    )
    if isinstance(message, AdvertiseRequest | RevealRequest | ShareKeysRequest):
        answer = client.receive(message)  # the session is fixed (and journaled) by this answer
    else:
        sid = client.session_id
        check_session(entry, sid)
        if isinstance(message, MaskedInputRequest):
            answer = client.receive(
                message,
                vector=lambda: _input_vector(
                    train,
                    config,
                    on_train=lambda: journal.mark(config.round_id, sid, "trained"),
                    party=party,
                    session_id=sid or b"",
                ),
            )
        else:
            answer = client.receive(message)
    _journal_answer(journal, message, answer, round_id=config.round_id, sid=client.session_id)
    if not isinstance(message, UnmaskRequest):
        transcript.append(state, payload, session_id=client.session_id)
    return encode(answer)


def _open_round(
    message: Any, journal: RoundJournal, key: bytes, *, state: RecordDict, party: SiteParty
) -> tuple[_Transcript, SessionConfig, RoundEntry]:
    """The round a request belongs to: begun now (an advert, after the floors and the encoding
    were checked), or the one in progress (its transcript from ``state``, its journal entry)."""
    if not isinstance(message, AdvertiseRequest):
        transcript = _Transcript.load(state, message.round_id)
        return transcript, transcript.config(), _entry_for(journal, message)
    config = message.config
    party.floors.check(config)  # a weaker offer is refused before anything is recorded or sent
    if config.encoding is None:
        raise RemoteProtocolError(
            "refused: the session does not bind how sites encode their updates"
        )
    if config.mode is Mode.ACTIVE:  # a clear refusal if the registry holds another key
        _publish(party.registry, party.client_id, key, party.identity)
    # refuses a round id the site ever served, and a round beyond the abandoned-round bound
    entry = journal.begin(config.round_id, run_id=party.run_id, limits=party.abandon)
    return _Transcript(config.round_id, []), config, entry


def _journal_answer(
    journal: RoundJournal, message: Any, answer: Any, *, round_id: bytes, sid: bytes | None
) -> None:
    """Journal an accepted answer, durably for the once-only kinds, before it leaves."""
    if isinstance(message, RevealRequest | ShareKeysRequest):
        # A sparse graph fixes the session at the reveal stage (the advert set is final there),
        # a complete graph at the share-keys stage; binding it at both refuses a server that shows
        # this site one advert set at the reveal and another at the share-keys stage.
        if sid is None:  # pragma: no cover - the client sets it when it answers these stages
            raise LocalProtocolError("no session id after the reveal or share-keys stage")
        journal.bind_session(round_id, sid)
    elif isinstance(message, MaskedInputRequest):
        journal.mark(round_id, sid, "masked")
    elif isinstance(message, ConsistencyRequest):
        journal.mark(round_id, sid, "signed")
    elif isinstance(message, UnmaskRequest) and isinstance(answer, UnmaskShares):
        journal.mark(
            round_id,
            sid,
            "unmasked",
            seed_shares_of=tuple(s.owner for s in answer.seed_shares),
            key_shares_of=tuple(s.owner for s in answer.key_shares),
        )


def _publish(
    registry: Path, client_id: int, key: bytes, identity: secagg_registry.SiteIdentity | None
) -> bytes:
    if identity is None:
        raise ConfigError("this site has no secure-aggregation identity (CA and certificate)")
    return secagg_registry.publish(registry, client_id, key, identity.site_certificate(key))


def _certified(registry: Path, identity: secagg_registry.SiteIdentity | None) -> dict[int, bytes]:
    """The peers this site accepts: registry entries with a valid certificate from its own CA."""
    if identity is None:
        raise ConfigError("this site has no secure-aggregation identity (CA and certificate)")
    return secagg_registry.load_registry(
        registry, ca=identity.ca_certificate(), expected=identity.expected
    )


def _entry_for(journal: RoundJournal, message: Any) -> RoundEntry:
    """The journal entry of a round in progress; refuses what the journal says already left."""
    entry = journal.entry(message.round_id)
    if entry is None:
        raise LocalProtocolError("refused: the round journal has no such round id")
    if entry.unmasked:
        raise LocalProtocolError(
            "refused: this site already answered an unmask request for this round"
        )
    if isinstance(message, MaskedInputRequest) and entry.masked:
        raise LocalProtocolError("refused: this site already sent its masked input for this round")
    if isinstance(message, MaskedInputRequest) and entry.trained:
        raise LocalProtocolError(
            "refused: this site already trained for this round (it trains and charges at most "
            "once per round id)"
        )
    if isinstance(message, ConsistencyRequest) and entry.signed:
        raise LocalProtocolError("refused: this site already signed a survivor set for this round")
    return entry


def session_encoding(config: SessionConfig) -> tuple[EncodingConfig, SiteClipping | None]:
    """The ring encoding and (with site-level DP) the clipping that ``config`` binds."""
    bound = config.encoding
    if bound is None:
        raise RemoteProtocolError("refused: the session does not bind how sites encode updates")
    encoding = EncodingConfig(
        bits=config.bits, clip=bound.clip, max_total_weight=bound.max_total_weight
    )
    if bound.dp_clip_norm == 0:
        return encoding, None
    return encoding, SiteClipping(bound.dp_clip_norm, bound.count_unclipped)


def _check_input(
    config: SessionConfig, *, size: int
) -> tuple[EncodingConfig, SiteClipping | None, int]:
    """Every parameter of the session that could make this site refuse after training, checked
    before it trains: the encoding, the session's vector length against the model's ``size``, the
    ring against the DP clip norm, and the per-site weight cap (``max_total_weight // n``, at least
    1). Returns the encoding, the clipping and the cap. Raises RemoteProtocolError."""
    encoding, clipping = session_encoding(config)
    if session_length(size, clipping) != config.length:
        raise RemoteProtocolError(
            f"refused before training: the session's vector length {config.length} does not fit "
            f"this model's {size} parameters"
        )
    cap = encoding.max_total_weight // len(config.clients)
    if clipping is None:
        if cap < 1:
            raise RemoteProtocolError(
                f"refused before training: the session's weight budget "
                f"{encoding.max_total_weight} leaves no weight for each of {len(config.clients)} sites"
            )
        return encoding, None, cap
    if not encoding.clip >= clipping.clip_norm:
        raise RemoteProtocolError(
            f"refused before training: the encoding's coordinate range {encoding.clip:g} is below "
            f"the clip norm {clipping.clip_norm:g}"
        )
    try:
        ring_clip_norm(clipping.clip_norm, dim=size, config=encoding)
    except ConfigError as exc:
        raise RemoteProtocolError(f"refused before training: {exc}") from None
    return encoding, clipping, cap


def _input_vector(
    train: Trainer,
    config: SessionConfig,
    *,
    on_train: Callable[[], object],
    party: SiteParty,
    session_id: bytes,
) -> np.ndarray:
    """Check the session (:func:`_check_input`), journal that the site trains (``on_train``), train,
    then encode under the session's encoding. Nothing data-dependent leaves in an error: the
    detail goes to the site's log, the raised error says which step failed."""
    size = train.size()
    if config.distributed is not None:
        return _distributed_input(train, config, size, on_train, party, session_id)
    encoding, clipping, cap = _check_input(config, size=size)
    on_train()  # durable: a second masked-input request for this round id is refused
    trained = _train(train)
    if trained.update.size != size:  # the site's own trainer broke its promise
        raise LocalProtocolError("local training produced an update of the wrong size")
    if trained.weight > cap:
        _log.info("secagg: weight %d capped to the session's per-site %d", trained.weight, cap)
    try:
        if clipping is None:
            weight = min(trained.weight, cap)
            return encode_update(trained.update, weight=weight, config=encoding, rng=CryptoRng())
        # site-level DP: clip here, before masking; every site weighs the same
        return encode_clipped_update(
            trained.update, clipping=clipping, config=encoding, rng=CryptoRng()
        )
    except FedcoreError as exc:
        _log.warning(
            "secagg: cannot encode the update (weight %d, %d values): %s",
            trained.weight,
            trained.update.size,
            exc,
        )
        raise LocalProtocolError(
            "this site's update does not fit the session's encoding (details in the site's log)"
        ) from None


def _distributed_input(
    train: Trainer,
    config: SessionConfig,
    size: int,
    on_train: Callable[[], object],
    party: SiteParty,
    session_id: bytes,
) -> np.ndarray:
    """Distributed DP (:mod:`fedcore.mechanisms.distributed`): before training, the session's
    encoding and the event this site charges, recomputed from what the session binds and checked
    against the site's own ledger (BudgetExceededError: it declines, nothing charged); then train,
    clip, rotate, round, noise, charge, and only then the vector is masked and leaves."""
    half = SiteHalf.prepare(
        party.distributed, config, dim=size, store=party.store, session_id=session_id
    )
    on_train()
    return half.release(_train(train).update)  # weight 1 (not sent); a wrong size is refused


def _train(train: Trainer) -> TrainedUpdate:
    """Run the trainer; a training error leaves as a LocalProtocolError without its text (the
    text goes to the site's log), a BudgetExceededError as itself (the site declines)."""
    try:
        return train()
    except FedcoreError as exc:
        _log.warning("secagg: local training failed: %s", exc)
        if isinstance(exc, ConfigError | LocalProtocolError | RemoteProtocolError):
            raise LocalProtocolError("local training failed (details in the site's log)") from None
        raise  # BudgetExceededError: the site declines, as without secure aggregation
    except Exception as exc:  # noqa: BLE001 - a training bug must not leak its text either
        _log.exception("secagg: local training failed")
        raise LocalProtocolError("local training failed (details in the site's log)") from exc


class _Transcript:
    """The public record of one round at a site, kept in ``context.state`` under ``secagg``."""

    def __init__(self, round_id: bytes, payloads: list[bytes]) -> None:
        self.round_id, self.payloads = round_id, payloads

    @classmethod
    def load(cls, state: RecordDict, round_id: bytes) -> _Transcript:
        """The transcript of ``round_id``; LocalProtocolError if this run's state holds another
        round's (a new round replaced it) or none (a new run, a restarted site)."""
        record = state.config_records.get(SECAGG)
        payloads = None if record is None else record.get("payloads")
        if record is None or record.get("round-id") != round_id or not isinstance(payloads, list):
            raise LocalProtocolError(
                "refused: this site holds no transcript of this round in this run (another round "
                "replaced it, or the run or the site restarted); a round cannot be resumed"
            )
        return cls(round_id, [p for p in payloads if isinstance(p, bytes)])

    def messages(self) -> list[Any]:
        return [_decoded(p) for p in self.payloads]

    def config(self) -> SessionConfig:
        """The session config of the round: its first message, the advertise request."""
        first = _decoded(self.payloads[0]) if self.payloads else None
        if not isinstance(first, AdvertiseRequest):
            raise LocalProtocolError(
                "refused: the round's transcript does not start with its advert"
            )
        return first.config

    def append(self, state: RecordDict, payload: bytes, *, session_id: bytes | None) -> None:
        self.payloads.append(payload)
        record = ConfigRecord({"round-id": self.round_id, "payloads": list(self.payloads)})
        if session_id is not None:
            record["session-id"] = session_id
        state[SECAGG] = record


def trained_update(
    reply_arrays: ArrayRecord, global_arrays: ArrayRecord, metrics: Mapping[str, Any]
) -> TrainedUpdate:
    """The flat update and integer weight from a train handler's reply."""
    weight = metrics.get("num-examples")
    if not isinstance(weight, int | float) or int(weight) != weight or weight < 0:
        raise RemoteProtocolError("train handler returned a bad num-examples")
    return TrainedUpdate(update=flat_update(reply_arrays, global_arrays), weight=int(weight))
