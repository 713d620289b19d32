"""What a run record says about where its inputs came from: the dataset's resolved path and
content hash, the fedcore commit, the device actually used.

Every function here is best effort about *optional* facts (a git commit exists only in a
checkout) and exact about the rest: the content hash covers every byte of the dataset file, or of
every file under a dataset folder, in sorted path order.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

from fedcore.config import Settings
from fedcore.data.settings import BUILTIN_DATASETS as BUILTIN
from fedcore.data.settings import HUB_PREFIX


def dataset_identity(settings: Settings) -> dict[str, Any]:
    """``{"dataset_path", "dataset_sha256"}`` for a local dataset (file or folder); for a built-in
    or hub dataset the path is None and the hash is None (the name and seed identify it)."""
    name = settings.dataset
    if name in BUILTIN or name.startswith(HUB_PREFIX):
        return {"dataset_path": None, "dataset_sha256": None}
    path = Path(name).expanduser().resolve()
    return {"dataset_path": str(path), "dataset_sha256": content_sha256(path)}


def label_mapping(settings: Settings) -> dict[str, str] | None:
    """``{class index: original label}`` for a local ``.npz``/``.csv``/``.parquet`` dataset whose
    labels are not already ``0..K-1`` (string labels, or numbers with gaps); None otherwise.

    The order is the one :func:`fedcore.data.arrays.encode_labels` gives (sorted unique values),
    read again from the label column only."""
    import numpy as np

    name = settings.dataset
    if name in BUILTIN or name.startswith(HUB_PREFIX):
        return None
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                labels = np.asarray(archive["y"])
        elif suffix in (".csv", ".parquet"):
            import pandas as pd

            column = settings.label_column
            frame = (
                pd.read_csv(path, usecols=[column])
                if suffix == ".csv"
                else pd.read_parquet(path, columns=[column])
            )
            labels = frame[column].to_numpy()
        else:
            return None
        classes = np.unique(labels)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if classes.dtype.kind in "iu" and np.array_equal(classes, np.arange(len(classes))):
        return None
    return {str(i): str(c) for i, c in enumerate(classes.tolist())}


def content_sha256(path: Path) -> str | None:
    """SHA-256 of a file's bytes, or of a folder's files (relative path and bytes, sorted)."""
    digest = hashlib.sha256()
    try:
        if path.is_file():
            _feed(digest, path)
        elif path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(str(file.relative_to(path)).encode() + b"\0")
                _feed(digest, file)
        else:
            return None
    except OSError:
        return None
    return digest.hexdigest()


def _feed(digest: Any, path: Path) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)


def fedcore_commit() -> str | None:
    """The git commit of the fedcore checkout this library runs from (``+dirty`` when it has
    uncommitted changes); None when installed outside a checkout or git is missing."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def run_facts(settings: Settings, *, device: str) -> dict[str, Any]:
    """The facts :class:`~fedcore.runrecord.RecordWriter` adds to ``config.json``."""
    return {
        **dataset_identity(settings),
        "label_mapping": label_mapping(settings),
        "fedcore_commit": fedcore_commit(),
        "device": device,
    }
