"""A site's side of secure aggregation inside a Flower round.

Theory of operation. The protocol itself is :class:`fedcore.secagg.SecAggClient` (Bonawitz et al.,
CCS 2017; Bell et al., CCS 2020). This module runs one stage of it per Flower message, and solves
the one problem Flower adds: a ClientApp may be a fresh process for every message (always in
deployment), so nothing secret can live in memory from one stage to the next, and nothing secret
may be stored in Flower's general-purpose ``context.state``. Therefore:

- A *site key* (32 random bytes) lives on the site's disk, ``<state-dir>/site-<id>.secagg.key``,
  created once with mode 0600. Every secret of a round (both X25519 key pairs, the self-mask seed,
  the share coins) is drawn from ``derive_rng(site_key, "secagg|" + round_id)`` in a fixed order,
  so any process of the site re-creates the same client.
- ``context.state`` keeps only public data: the round id, the server messages received in that
  round (they travelled in the clear) and the session id the site answered.
- Each stage rebuilds the client by replaying that transcript
  (:meth:`~fedcore.secagg.SecAggClient.rebuild`), answers the new message, and appends it.
- A site answers one unmask request per round id, ever, and only for the session it joined:
  before answering, the round id joins the node's list of unmasked rounds (``secagg-unmasked``,
  kept for the whole run), so a server that replays a different history to a fresh process
  (forking the client to learn both shares of a peer), now or in a later round, is refused.

In ACTIVE mode (``registry`` given) the site also signs with an Ed25519 key derived from the same
site key, publishes its public half in the registry folder (:mod:`fedcore.federation.secagg_registry`)
when asked to enrol and before advertising, checks every signature against that folder, and
refuses a round the server offers in the other mode (no silent downgrade).

At the masked-input stage the site trains (the wrapped train handler), forms its update (new
weights minus global weights, flattened in the global record's key order), and encodes weight x
update together with the weight (:func:`fedcore.secagg.encode_update`), so the server can form the
exact weighted mean from the sum alone. With site-level DP at the server, the request carries the L2 clip norm:
the site clips before masking and weighs 1 (:mod:`fedcore.federation.secagg_dp`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedcore.crypto import CryptoRng
from fedcore.crypto.agreement import derive_rng
from fedcore.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from fedcore.federation import secagg_registry
from fedcore.federation.secagg_dp import SiteClipping, encode_clipped_update
from fedcore.secagg import (
    EncodingConfig,
    SecAggClient,
    decode_server_message,
    encode,
    encode_update,
)
from fedcore.secagg.config import Mode
from fedcore.secagg.messages import AdvertiseRequest, MaskedInputRequest, UnmaskRequest

SECAGG = "secagg"  # the record that carries a protocol stage, in requests and replies
ENROL = "enrol"  # ACTIVE mode: publish the site's signing key in the registry
UNMASKED = "secagg-unmasked"  # every round id this node answered an unmask request for
KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class TrainedUpdate:
    """What the wrapped train handler produced: the flat update and the site's integer weight."""

    update: np.ndarray
    weight: int


def site_key(state_dir: Path, site_id: int) -> bytes:
    """The site's secagg key, created (0600) on first use. Raises ConfigError if unreadable."""
    path = state_dir / f"site-{site_id}.secagg.key"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process of the site created it first
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(KEY_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ConfigError(f"secagg key {str(path)!r} holds {len(key)} bytes, expected {KEY_BYTES}")
    return key


def request_record(
    *,
    stage: str,
    payload: bytes,
    encoding: EncodingConfig | None = None,
    clipping: SiteClipping | None = None,
) -> ConfigRecord:
    """A stage request; the masked-input stage also carries the encoding, and with site-level DP
    the L2 clip norm each site applies before masking (public parameters, no secret)."""
    record = ConfigRecord({"stage": stage, "payload": payload})
    if encoding is not None:
        record["bits"] = encoding.bits
        record["clip"] = encoding.clip
        record["max-total-weight"] = encoding.max_total_weight
    if clipping is not None:
        record["l2-clip"] = clipping.clip_norm
        record["count-unclipped"] = clipping.count_unclipped
    return record


def _encoding(request: ConfigRecord) -> EncodingConfig:
    try:
        return EncodingConfig(
            bits=int(request["bits"]),  # type: ignore[arg-type]
            clip=float(request["clip"]),  # type: ignore[arg-type]
            max_total_weight=int(request["max-total-weight"]),  # type: ignore[arg-type]
        )
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise RemoteProtocolError(f"masked-input request lacks a valid encoding: {exc}") from exc


def _clipping(request: ConfigRecord) -> SiteClipping | None:
    """The DP clipping a masked-input request asks for (None: no site-level DP this round)."""
    if "l2-clip" not in request:
        return None
    clip, count = request["l2-clip"], request.get("count-unclipped", False)
    if (
        isinstance(clip, bool)
        or not isinstance(clip, int | float)
        or not (math.isfinite(clip) and clip > 0)
        or not isinstance(count, bool)
    ):
        raise RemoteProtocolError(
            f"masked-input request has a bad l2-clip {clip!r} or count-unclipped {count!r}"
        )
    return SiteClipping(clip_norm=float(clip), count_unclipped=count)


def flat_update(new: ArrayRecord, old: ArrayRecord) -> np.ndarray:
    """``new - old`` over every array, flattened in ``old``'s key order (float64)."""
    return np.concatenate(
        [
            (new[k].numpy().astype(np.float64) - old[k].numpy().astype(np.float64)).ravel()
            for k in old.keys()
        ]
    )


def answer_stage(
    request: ConfigRecord,
    *,
    client_id: int,
    key: bytes,
    state: RecordDict,
    train: Callable[[], TrainedUpdate],
    registry: Path | None = None,
) -> bytes:
    """Answer one protocol stage; return the reply payload (wire bytes).

    ``state`` is the node's Flower ``context.state``; only public data is written to it. ``train``
    is called at the masked-input stage only. ``registry`` is the folder of site signing keys: set,
    the site runs ACTIVE mode (enrols, signs, checks signatures) and refuses a round the server
    offers in SEMI_HONEST mode; None, the site runs SEMI_HONEST mode and refuses ACTIVE rounds.
    Raises RemoteProtocolError / InvalidMessage for a request that breaks the protocol,
    LocalProtocolError for a second unmask request of a round.
    """
    if request.get("stage") == ENROL:
        if registry is None:
            raise RemoteProtocolError(
                "asked to enrol a signing key, but this site runs semi-honest mode"
            )
        # The reply echoes the public key for the record; the server trusts only the folder.
        return secagg_registry.publish(registry, client_id, key)
    payload = request.get("payload")
    if not isinstance(payload, bytes):
        raise RemoteProtocolError("a secagg request needs a bytes 'payload'")
    message = decode_server_message(payload)
    mode = Mode.SEMI_HONEST if registry is None else Mode.ACTIVE
    if isinstance(message, AdvertiseRequest):
        if message.config.mode is not mode:
            raise RemoteProtocolError(  # a server must not downgrade (or upgrade) the threat model
                f"the server asks for {message.config.mode.name} mode; this site runs {mode.name}"
            )
        if registry is not None:  # a clear refusal if the registry holds another key for this node
            secagg_registry.publish(registry, client_id, key)
    round_id = (
        message.config.round_id if isinstance(message, AdvertiseRequest) else message.round_id
    )
    transcript = _Transcript.load(state, round_id)
    rng = derive_rng(key, context=b"secagg|" + round_id)
    if transcript.unmasked or round_id in _unmasked_rounds(state):
        raise LocalProtocolError("this site already answered an unmask request for this round")
    client = SecAggClient.rebuild(
        client_id,
        transcript.messages(),
        rng=rng,
        signing_key=None if registry is None else secagg_registry.signing_seed(key),
        registry=None if registry is None else secagg_registry.load_registry(registry),
    )
    vector = None
    if isinstance(message, MaskedInputRequest):
        trained = train()
        clipping = _clipping(request)
        if clipping is None:
            vector = encode_update(
                trained.update, weight=trained.weight, config=_encoding(request), rng=CryptoRng()
            )
        else:  # site-level DP: clip here, before masking; every site weighs the same
            vector = encode_clipped_update(
                trained.update, clipping=clipping, config=_encoding(request), rng=CryptoRng()
            )
    if isinstance(message, UnmaskRequest):
        transcript.mark_unmasked(state)  # before answering: at most one answer, ever
    answer = encode(client.receive(message, vector=vector))
    if not isinstance(message, UnmaskRequest):
        transcript.append(state, payload, session_id=client.session_id)
    return answer


class _Transcript:
    """The public record of one round at a site, kept in ``context.state`` under ``secagg``."""

    def __init__(self, round_id: bytes, payloads: list[bytes], unmasked: bool) -> None:
        self.round_id, self.payloads, self.unmasked = round_id, payloads, unmasked

    @classmethod
    def load(cls, state: RecordDict, round_id: bytes) -> _Transcript:
        record = state.config_records.get(SECAGG)
        if record is None or record.get("round-id") != round_id:
            return cls(round_id, [], False)  # a new round replaces the old transcript
        payloads = record.get("payloads", [])
        return cls(
            round_id,
            [p for p in payloads if isinstance(p, bytes)] if isinstance(payloads, list) else [],
            bool(record.get("unmasked")),
        )

    def messages(self) -> list[Any]:
        return [decode_server_message(p) for p in self.payloads]

    def _save(self, state: RecordDict, session_id: bytes | None) -> None:
        record = ConfigRecord(
            {"round-id": self.round_id, "payloads": list(self.payloads), "unmasked": self.unmasked}
        )
        if session_id is not None:
            record["session-id"] = session_id
        state[SECAGG] = record

    def append(self, state: RecordDict, payload: bytes, *, session_id: bytes | None) -> None:
        self.payloads.append(payload)
        self._save(state, session_id)

    def mark_unmasked(self, state: RecordDict) -> None:
        self.unmasked = True
        self._save(state, None)
        state[UNMASKED] = ConfigRecord({"round-ids": [*_unmasked_rounds(state), self.round_id]})


def _unmasked_rounds(state: RecordDict) -> list[bytes]:
    record = state.config_records.get(UNMASKED)
    ids = [] if record is None else record.get("round-ids", [])
    return [i for i in ids if isinstance(i, bytes)] if isinstance(ids, list) else []


def trained_update(
    reply_arrays: ArrayRecord, global_arrays: ArrayRecord, metrics: Mapping[str, Any]
) -> TrainedUpdate:
    """The flat update and integer weight from a train handler's reply."""
    weight = metrics.get("num-examples")
    if not isinstance(weight, int | float) or int(weight) != weight or weight < 0:
        raise RemoteProtocolError(f"train handler returned a bad num-examples {weight!r}")
    return TrainedUpdate(update=flat_update(reply_arrays, global_arrays), weight=int(weight))
