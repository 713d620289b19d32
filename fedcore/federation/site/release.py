"""A site's release cache: the update it last released in a run, re-sent if that round is asked again.

Theory of operation. Under record-level DP (DP-SGD, ``dp.site.epsilon``) every update a site sends
is a release, charged to the site's ledger before it leaves (:mod:`fedcore.federation.site.folders`).
A resumed run (``fedcore simulate --resume``) asks again for the round it was in when it stopped,
and some sites may have answered that round already. Training afresh would be a second release of
the same records, charged again; sending the *same bytes* again reveals nothing new
(post-processing: Dwork and Roth 2014, Proposition 2.1) and costs nothing. So a site keeps, per run,
the last update it released and the question it answered:

- the *key*: the fedcore run id (``fedcore-run-id`` in the train config, made with the run record
  and the same after a resume; Flower's run id is not), the round number, and a SHA-256 digest of
  the instruction (every array of the global model, names, dtypes and shapes included, and the
  train config);
- the *release*: the update's arrays, its example count, and the epsilon the site reported.

The release is stored (atomically, mode 0600, under the site's ``release`` lock) *after* its ledger
charge and *before* the reply leaves. Asked a question whose key matches, the site re-sends that
release and charges nothing. A different global model for the same run and round is a different
question: the site trains and is charged for a new release (never refused: the charge keeps the
accounting exact). A crash between the charge and the store costs one extra charge, never an
uncharged release.

Never under secure aggregation: there the server learns only a sum, and putting one update into
two sessions with different survivor sets would reveal the difference of the two sums
(:mod:`fedcore.federation.site.journal`), so a resumed round is a new session with fresh
training, charged as a new release; :func:`release_key` gives no key under secure aggregation
or for a secure-aggregation message, and :func:`fedcore.federation.site.rounds.train_round` ignores one
there.

A stored file is trusted only after every check: a private regular file owned by this user
(:func:`~fedcore._files.read_private`), its own SHA-256 over key and content, and
its key equal to the question asked. A file that fails any check is ignored with a WARNING: the
site trains and is charged afresh (budget spent, privacy intact), and never re-sends an update that
was not the answer to this exact question. The digest detects damage, not forgery: whoever can
write the state folder can also rewrite the ledger (keep it where only the operator writes).

Disk: one file per site and run (the latest release of that run replaces the earlier), and the
files of at most :data:`KEEP_RUNS` runs per site (the oldest are removed; a run whose file is gone
only loses the free re-send).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from fedcore._files import atomic_write, read_private
from fedcore.config import Settings
from fedcore.federation import messages as m
from fedcore.federation.site.store import SiteStore
from fedcore.protections import protections_of

log = logging.getLogger(__name__)

FORMAT = 1
KEEP_RUNS = 4  # release files kept per site: the latest release of each of the last KEEP_RUNS runs
LOCK = "release"


@dataclass(frozen=True, slots=True)
class ReleaseKey:
    """The question a release answered: run, round, and the digest of the instruction."""

    run_id: str
    server_round: int
    instruction: str  # hex SHA-256 of the global model and the train config


@dataclass(frozen=True, slots=True)
class Release:
    """An update a site released: its arrays, the weight it reported, the epsilon it reported."""

    state: dict[str, torch.Tensor]
    num_examples: int
    site_epsilon: float
    site_charges: int | None = None  # the ledger's entries after the charge (None: older files)


def instruction_digest(arrays: ArrayRecord, config: ConfigRecord) -> str:
    """SHA-256 (hex) of a train instruction: every array (name, dtype, shape, bytes, in name
    order) and every config entry (in key order)."""
    digest = hashlib.sha256(b"fedcore.instruction.v1\0")
    for name in sorted(arrays.keys()):
        values = np.ascontiguousarray(arrays[name].numpy())
        _feed(digest, name, str(values.dtype), json.dumps(list(values.shape)))
        digest.update(values.tobytes())
    for key in sorted(config.keys()):
        _feed(digest, key, repr(config[key]))
    return digest.hexdigest()


def release_key(msg: Message, settings: Settings) -> ReleaseKey | None:
    """The key of the question a train instruction asks, or None where no release is kept or
    re-sent: record-level DP is off (nothing is charged), secure aggregation is on or the message
    is a secure-aggregation stage, or the server sent no run id. Raises
    :class:`~fedcore.errors.RemoteProtocolError` for a malformed instruction."""
    protections = protections_of(settings)
    if protections.record is None or protections.secagg is not None:
        return None
    if m.SECAGG in msg.content.config_records:
        return None
    arrays, config = m.instruction(msg)
    run_id = m.read_run_id(config)
    if run_id is None:
        return None
    server_round, _, _ = m.read_train_config(config)
    return ReleaseKey(run_id, server_round, instruction_digest(arrays, config))


def lookup(store: SiteStore, key: ReleaseKey) -> Release | None:
    """The release stored for exactly ``key``, or None. A missing file, a file for another
    question, and a damaged or unsafe file (logged as a WARNING) all give None; nothing raises
    for the file's content. Call under ``store.lock(LOCK)``."""
    path = store.release_path(key.run_id)
    if not path.exists():
        return None
    try:
        doc = torch.load(io.BytesIO(read_private(path)), weights_only=True)
        stored_key, release = _parse(doc, site_id=store.site_id)
    except Exception as exc:  # noqa: BLE001 - any damage to the file is the same: not re-sent
        log.warning(
            "fedcore site %d: ignoring the release file %s (%s); the site trains and is charged "
            "afresh",
            store.site_id,
            path,
            exc,
        )
        return None
    if stored_key != key:
        if stored_key.run_id != key.run_id:
            log.warning(
                "fedcore site %d: the release file %s belongs to run %s, not %s; ignored",
                store.site_id,
                path,
                stored_key.run_id,
                key.run_id,
            )
        return None
    return release


def record(store: SiteStore, key: ReleaseKey, release: Release) -> None:
    """Store ``release`` as the answer to ``key``, replacing the run's earlier one, and remove the
    files of runs beyond the last :data:`KEEP_RUNS`. Call under ``store.lock(LOCK)``, before the
    reply leaves. Raises ``OSError`` if the file cannot be written (the caller may still send)."""
    arrays = {k: v.detach().cpu().contiguous() for k, v in release.state.items()}
    doc = {
        "format": FORMAT,
        "site_id": store.site_id,
        "run_id": key.run_id,
        "round": key.server_round,
        "instruction": key.instruction,
        "num_examples": int(release.num_examples),
        "site_epsilon": float(release.site_epsilon),
        "site_charges": release.site_charges,
        "arrays": arrays,
    }
    doc["sha256"] = _content_digest(doc)
    buffer = io.BytesIO()
    torch.save(doc, buffer)
    path = store.ensure().release_path(key.run_id)
    atomic_write(path, buffer.getvalue())
    _prune(store, keep=path)


def _prune(store: SiteStore, *, keep: Path) -> None:
    others = [p for p in store.release_paths() if p != keep]
    if len(others) < KEEP_RUNS:
        return
    others.sort(key=lambda p: p.stat().st_mtime)
    for path in others[: len(others) - (KEEP_RUNS - 1)]:
        path.unlink(missing_ok=True)


def _parse(doc: object, *, site_id: int) -> tuple[ReleaseKey, Release]:
    """The key and release of a loaded file; ValueError/KeyError/TypeError if it is not whole."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError("not a release file of this format")
    if doc.get("sha256") != _content_digest({k: v for k, v in doc.items() if k != "sha256"}):
        raise ValueError("its checksum does not match its content")
    if doc["site_id"] != site_id:
        raise ValueError(f"it belongs to site {doc['site_id']!r}")
    arrays = doc["arrays"]
    if not isinstance(arrays, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in arrays.items()
    ):
        raise TypeError("its arrays are not a state dict")
    key = ReleaseKey(str(doc["run_id"]), int(doc["round"]), str(doc["instruction"]))
    release = Release(
        state=dict(arrays),
        num_examples=int(doc["num_examples"]),
        site_epsilon=float(doc["site_epsilon"]),
        site_charges=None if doc.get("site_charges") is None else int(doc["site_charges"]),
    )
    return key, release


def _content_digest(doc: Mapping[str, object]) -> str:
    """SHA-256 (hex) over every field of a release file but its checksum, arrays by name."""
    digest = hashlib.sha256(b"fedcore.release.v1\0")
    for name in sorted(doc):
        value = doc[name]
        if name == "arrays":
            if not isinstance(value, Mapping):
                raise TypeError("its arrays are not a mapping")
            for key in sorted(value):
                tensor = value[key]
                if not isinstance(tensor, torch.Tensor):
                    raise TypeError(f"array {key!r} is not a tensor")
                _feed(digest, key, str(tensor.dtype), json.dumps(list(tensor.shape)))
                raw = tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8)
                digest.update(raw.numpy().tobytes())
        else:
            _feed(digest, name, repr(value))
    return digest.hexdigest()


def _feed(digest: object, *parts: str) -> None:
    for part in parts:
        data = part.encode()
        digest.update(len(data).to_bytes(8, "little") + data)  # type: ignore[attr-defined]
