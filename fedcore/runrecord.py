"""The run record: one folder that says what a run was, what happened each round, and what it made.

- ``config.json``: the full resolved settings, plus versions, the start time and
  ``fedcore_run_id`` (random, made with the record, the same after ``--resume``: a site knows a
  resumed run's round as one it may have answered; :mod:`fedcore.federation.site.release`);
- ``history.jsonl``: one JSON object per round, appended and flushed as each round ends, so a run
  that crashes keeps every finished round;
- ``model.pt``: the final global model's ``state_dict`` (written atomically);
- ``summary.md`` and ``accuracy.png``: what a person looks at first (and, with DP on,
  ``privacy.png``), written by :func:`fedcore.report.close_record`, which the server calls to close
  a run; this module never imports the report;
- with DP on, ``privacy.json`` (the ledgers and every round's epsilons);
- ``operator.jsonl`` (mode 0600): per round, the bytes each exchange or stage carried by stage and
  by node (:data:`OPERATOR_ONLY`) and, with DP on, the diagnostics the privacy guarantee does
  not cover and that are therefore kept out of ``history.jsonl`` and ``summary.md``
  (:class:`fedcore.protections.Publication`). It is for the operator, who already sees them; publish it and the
  epsilons no longer hold as stated.
- ``checkpoint.pt`` (:mod:`fedcore.federation.server.checkpoint`): what a resumed run continues from;
- ``sites.json``: which Flower node id was which site (failures are keyed by node id,
  ``site_epsilon`` by site id), as the sites reported it;
- ``status.json``: how the run ended (``completed``, ``stopped``, ``failed``, ``interrupted``), its
  reason and the rounds completed, for programs (``fedcore simulate`` takes its exit status from it).
- ``.writer.lock``: one writer at a time (:func:`record_writer`). The server holds an OS lock on it
  while it writes the record, so a ``--resume`` cannot start while the server of the run it
  continues is still alive (a killed ``deploy-local`` or ``flwr run`` leaves a ServerApp that lives
  on for a while); the kernel releases it when the holder dies, however it dies.

Round 0 in memory is the initial model's central evaluation; it is shown in the summary and the
plot but not written to ``history.jsonl``, whose rows are rounds 1..R.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import math
import os
import platform
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from fedcore import __version__
from fedcore._files import PUBLIC_MODE, atomic_write_through, json_bytes
from fedcore.config import Settings
from fedcore.errors import ConfigError, RecordInUseError
from fedcore.protections import (  # noqa: F401 - the lists, re-exported for readers
    RECORD_LEVEL_WITHHELD,
    SITE_LEVEL_WITHHELD,
    protections_of,
)

Status = Literal["completed", "stopped", "failed", "interrupted"]
STATUS_FILE = "status.json"

HISTORY_FIELDS = (
    "round",
    "sites_sampled",
    "sites_replied",
    "sites_failed",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "seconds",
    "bytes_down",
    "bytes_up",
)


@dataclass(frozen=True, slots=True)
class RoundRow:
    """One line of ``history.jsonl``. NaN metrics (nothing to measure) are written as ``null``."""

    round: int
    sites_sampled: int
    sites_replied: int
    sites_failed: int
    train_loss: float
    eval_loss: float
    eval_accuracy: float
    seconds: float
    bytes_down: int
    bytes_up: int
    num_examples: int = 0  # training examples behind the aggregated update
    ended_at: float = math.nan  # Unix time at which the round ended
    site_eval_loss: float = math.nan
    site_eval_accuracy: float = math.nan
    failures: Mapping[str, str] = field(default_factory=dict)
    sites_declined: int = 0  # sites whose record-level budget could not afford the round
    site_epsilon: Mapping[str, float] = field(
        default_factory=dict
    )  # site id -> record-level epsilon
    server_epsilon: float = math.nan  # the federation's site-level epsilon (DP-FedAvg); null if off
    extra: Mapping[str, Any] = field(default_factory=dict)  # fields added by privacy layers
    round_failed: bool = False  # every site asked to train failed (none replied, none declined)

    def to_json(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if k != "extra"}
        row["failures"] = dict(self.failures)
        row["site_epsilon"] = dict(self.site_epsilon)
        row.update(self.extra)
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RoundRow:
        """The row :meth:`to_json` wrote (``null`` metrics back to NaN; unknown keys to ``extra``)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in doc and f.name != "extra":
                value = doc[f.name]
                kwargs[f.name] = math.nan if value is None and f.type in ("float", float) else value
        kwargs["extra"] = {k: v for k, v in doc.items() if k not in names}
        return cls(**kwargs)


OPERATOR_FILE = "operator.jsonl"
# Fields of every run's rows that go to operator.jsonl, DP or not: the serialized bytes of each
# exchange or protocol stage, by stage and by node (:func:`fedcore.federation.server.exchange.wire_fields`);
# per node they would say who took part, and nobody but the operator needs them.
OPERATOR_ONLY = ("bytes_by_stage", "wire_by_site")


def read_rows(out_dir: str | Path, *, operator: bool = False) -> list[dict[str, Any]]:
    """The rows of ``history.jsonl``; with ``operator``, merged with ``operator.jsonl``'s."""
    path = Path(out_dir)
    rows = [json.loads(x) for x in (path / "history.jsonl").read_text().splitlines() if x.strip()]
    extra = path / OPERATOR_FILE
    if operator and extra.exists():
        by_round = {
            doc["round"]: doc
            for doc in (json.loads(x) for x in extra.read_text().splitlines() if x.strip())
            if "round" in doc
        }
        rows = [{**row, **by_round.get(row["round"], {})} for row in rows]
    return rows


def _append_private(path: Path, doc: Mapping[str, Any]) -> None:
    """Append one JSON line to ``path``, created with mode 0600; flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(json.dumps(doc) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def default_out_dir(root: str | Path = "runs") -> Path:
    return Path(root) / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


WRITER_LOCK = ".writer.lock"


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
        return f"process {pid}"
    return "another process"


@contextlib.contextmanager
def record_writer(out_dir: str | Path, *, wait: float = 0.0) -> Iterator[None]:
    """Be the one writer of the record in ``out_dir`` (created if needed) while inside: an
    exclusive ``flock`` on ``out_dir/.writer.lock``, which holds the writer's process id. Waits up
    to ``wait`` seconds for another holder, then raises :class:`RecordInUseError` naming it."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RecordInUseError(
                        f"the run record {str(path)!r} is being written by {_holder(fd)}: a run "
                        "still going on, or the server of one that was stopped and has not exited "
                        "yet; stop it (or wait for it to end) first"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def check_not_in_use(out_dir: str | Path) -> None:
    """Raise :class:`RecordInUseError` if a process is writing the record in ``out_dir`` (a
    folder that does not exist is not in use, and is not created)."""
    if (Path(out_dir) / WRITER_LOCK).exists():
        with record_writer(out_dir):
            pass


class RecordWriter:
    """Writes a run record into exactly ``out_dir`` (created if needed): the server's half of the
    record (:func:`record_writer` is the lock that makes a process its one writer);
    :class:`fedcore.api.record.RunRecord`, ``fedcore.RunRecord``, is the read-only view for users.

    Raises :class:`ConfigError` if ``out_dir`` exists and is not an empty directory holding no
    earlier run (a run record is never overwritten).
    """

    def __init__(
        self, out_dir: str | Path, settings: Settings, *, extra: Mapping[str, Any] | None = None
    ):
        self.path = Path(out_dir)
        if self.path.exists() and (
            not self.path.is_dir() or (self.path / "history.jsonl").exists()
        ):
            raise ConfigError(
                f"output directory {str(self.path)!r} already holds a run record or is a file"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.rows: list[RoundRow] = []
        self.initial_loss = math.nan
        self.initial_accuracy = math.nan
        self.started = dt.datetime.now(dt.UTC)
        self.run_id: str | None = secrets.token_hex(16)
        config = {
            "settings": settings.to_dict(),
            "fedcore_run_id": self.run_id,
            "fedcore_version": __version__,
            "flwr_version": _version("flwr"),
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "started_at": self.started.isoformat(timespec="seconds"),
            **dict(extra or {}),
        }
        atomic_write_through(
            self.path / "config.json",
            lambda fh: fh.write(json.dumps(config, indent=2).encode()),
            mode=PUBLIC_MODE,
        )
        (self.path / "history.jsonl").touch()

    @classmethod
    def reopen(
        cls,
        out_dir: str | Path,
        settings: Settings,
        *,
        rows: list[RoundRow],
        initial_loss: float,
        initial_accuracy: float,
    ) -> RecordWriter:
        """The record in ``out_dir`` as of a checkpoint: ``history.jsonl`` is rewritten to exactly
        ``rows`` (a round appended after the checkpoint is dropped, to be run again)."""
        record = cls.__new__(cls)
        record.path = Path(out_dir)
        record.settings = settings
        record.rows = list(rows)
        record.initial_loss, record.initial_accuracy = initial_loss, initial_accuracy
        try:
            config = json.loads((record.path / "config.json").read_text())
            record.started = dt.datetime.fromisoformat(config["started_at"])
            # A record made before run ids has none: its sites then keep no release to re-send.
            record.run_id = config.get("fedcore_run_id")
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{str(record.path)!r} holds no readable run record: {exc}") from exc
        text = "".join(json.dumps(record._public(r.to_json())) + "\n" for r in rows)
        atomic_write_through(
            record.path / "history.jsonl", lambda fh: fh.write(text.encode()), mode=PUBLIC_MODE
        )
        return record

    SITES_FILE = "sites.json"

    def note_sites(self, node_to_site: Mapping[str, int]) -> None:
        """Remember which node id is which site; ``sites.json`` is rewritten when it learns more."""
        known = getattr(self, "_sites", None)
        if known is None:
            known = self._sites = self._read_sites()
        if all(known.get(k) == v for k, v in node_to_site.items()):
            return
        known.update(node_to_site)
        self.write_json(
            self.SITES_FILE,
            {"node_to_site": dict(sorted(known.items(), key=lambda kv: (kv[1], kv[0])))},
        )

    def _read_sites(self) -> dict[str, int]:
        try:
            return dict(json.loads((self.path / self.SITES_FILE).read_text())["node_to_site"])
        except (OSError, ValueError, KeyError):
            return {}

    def set_initial(self, *, loss: float, accuracy: float) -> None:
        self.initial_loss, self.initial_accuracy = loss, accuracy

    def append(self, row: RoundRow) -> None:
        """Append one round to ``history.jsonl`` and flush it to disk; the fields the privacy
        guarantee does not cover (:meth:`_withheld`) go to ``operator.jsonl`` instead."""
        self.rows.append(row)
        doc = row.to_json()
        withheld = self._withheld()
        with open(self.path / "history.jsonl", "a") as fh:
            fh.write(json.dumps(self._public(doc)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if withheld:
            private = {k: v for k, v in doc.items() if k in withheld}
            self.write_operator({"round": row.round, **private})

    def _public(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """A history row without the fields the privacy guarantee does not cover."""
        withheld = self._withheld()
        return {k: v for k, v in doc.items() if k not in withheld}

    def _withheld(self) -> tuple[str, ...]:
        """The history fields that go to ``operator.jsonl`` instead of ``history.jsonl``: what the
        run may publish is decided by its protections (:class:`fedcore.protections.Publication`)."""
        return (*protections_of(self.settings).publication.withheld_fields(), *OPERATOR_ONLY)

    def write_operator(self, doc: Mapping[str, Any]) -> None:
        """Append one line to ``operator.jsonl`` (mode 0600): diagnostics kept out of the record."""
        _append_private(self.path / OPERATOR_FILE, doc)

    def write_json(self, name: str, doc: Mapping[str, Any]) -> None:
        """Write ``doc`` as ``name`` in the record, atomically, as strict JSON: a NaN or an
        infinity is written as ``null`` (bare ``NaN`` is not JSON; other readers refuse it)."""
        data = json_bytes(doc, indent=2)
        atomic_write_through(self.path / name, lambda fh: fh.write(data), mode=PUBLIC_MODE)

    def save_model(self, state: Mapping[str, torch.Tensor]) -> None:
        atomic_write_through(
            self.path / "model.pt", lambda fh: torch.save(dict(state), fh), mode=PUBLIC_MODE
        )

    def finish(self, *, status: Status, reason: str = "") -> None:
        """Write the record's own closing file, ``status.json`` (how the run ended); safe to call
        after a failure. The summary and the plots are the report's: a server closes a run with
        :func:`fedcore.report.close_record`, which writes them and then calls this."""
        self.write_json(
            STATUS_FILE,
            {"status": status, "reason": reason, "rounds_completed": len(self.rows)},
        )

    @property
    def final_accuracy(self) -> float:
        return self.rows[-1].eval_accuracy if self.rows else self.initial_accuracy


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
