"""The checkpoint a run writes after every round, and what a resumed run reads back.

``checkpoint.pt`` in the run record holds, as of the last completed round R (0: the initial model,
evaluated):

- the global model's arrays, dtypes kept;
- the strategy's memory (server optimizer moments, momentum: :func:`strategy_state`);
- DP-FedAvg's clip norm for the next round (it moves with adaptive clipping);
- the server's ``random`` and NumPy global states (Flower's samplers draw from ``random``);
- the history (rows 1..R and round 0's evaluation) and how often the run was resumed.

It is written atomically (a temporary file, fsync, rename) after the round's row is appended to
``history.jsonl``, so the checkpoint is the truth about which rounds completed: a run killed
between the two resumes at round R and rewrites ``history.jsonl`` from the checkpoint, so every
round appears there once. Only tensors, numbers, strings, lists and dicts are stored, and the file
is read with ``torch.load(weights_only=True)``: opening someone's run record runs no code.

Privacy is not in the checkpoint: the federation's ledger (``federation.ledger.json``) and each
site's ledger are written when a charge is made, before the release, so a round charged but not
completed stays charged. The resumed attempt of that round is charged as a new release, except at
a site with record-level DP and no secure aggregation that already answered it: that site re-sends
the release it made, uncharged (:mod:`fedcore.federation.site.release`, keyed by the record's
``fedcore_run_id``, which a resume keeps).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcore._files import PRIVATE_MODE, atomic_write_through
from fedcore.errors import ConfigError

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1


@dataclass(frozen=True, slots=True)
class Checkpoint:
    round: int
    arrays: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    initial_loss: float
    initial_accuracy: float
    strategy: dict[str, Any] = field(default_factory=dict)
    clip_norm: float | None = None
    random_state: dict[str, Any] = field(default_factory=dict)
    resumes: int = 0


def capture_random_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }


def restore_random_state(state: dict[str, Any]) -> None:
    if not state:
        return
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached"],
        )
    )


def write_checkpoint(out_dir: Path, checkpoint: Checkpoint) -> None:
    doc = {
        "format": FORMAT,
        "round": checkpoint.round,
        "arrays": dict(checkpoint.arrays),
        "history": json.dumps(checkpoint.history),
        "initial_loss": checkpoint.initial_loss,
        "initial_accuracy": checkpoint.initial_accuracy,
        "strategy": checkpoint.strategy,
        "clip_norm": checkpoint.clip_norm,
        "random_state": checkpoint.random_state,
        "resumes": checkpoint.resumes,
    }
    # Private (0600): the checkpoint holds the whole history, the diagnostics of operator.jsonl too.
    atomic_write_through(
        Path(out_dir) / CHECKPOINT_FILE, lambda fh: torch.save(doc, fh), mode=PRIVATE_MODE
    )


def read_checkpoint(out_dir: Path) -> Checkpoint | None:
    """The record's checkpoint, or None if it has none; :class:`ConfigError` if it is unreadable."""
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        doc = torch.load(path, weights_only=True)
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT}")
        return Checkpoint(
            round=int(doc["round"]),
            arrays=dict(doc["arrays"]),
            history=json.loads(doc["history"]),
            initial_loss=float(doc["initial_loss"]),
            initial_accuracy=float(doc["initial_accuracy"]),
            strategy=dict(doc["strategy"]),
            clip_norm=None if doc["clip_norm"] is None else float(doc["clip_norm"]),
            random_state=dict(doc["random_state"]),
            resumes=int(doc["resumes"]),
        )
    except Exception as exc:  # noqa: BLE001 - any damage to the file is the same refusal
        raise ConfigError(f"the checkpoint {str(path)!r} cannot be read: {exc}") from exc
