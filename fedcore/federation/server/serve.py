"""Everything the ServerApp does, as one library call: :func:`run_server`.

It loads the server's held-out set for central evaluation, builds the initial model (seeded), the
strategy and the run record, runs the rounds, saves the final model and writes the summary. The run
record is finished (summary and plot) also when a round raises, with the status ``failed``.

After the initial evaluation and after every round it writes ``checkpoint.pt``
(:mod:`fedcore.federation.server.checkpoint`). With ``resume`` set, it continues the record in ``out``
from that checkpoint instead of starting one: same settings (checked against ``config.json`` by
:func:`resume_settings`), model, strategy memory, clip norm and random state. A run stopped by a
signal is closed from outside by :func:`close_interrupted`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedcore.config import Settings
from fedcore.data import load_holdout
from fedcore.errors import ConfigError
from fedcore.federation import messages as m
from fedcore.federation.server import exiting, receipts
from fedcore.federation.server.checkpoint import (
    Checkpoint,
    capture_random_state,
    read_checkpoint,
    restore_random_state,
    write_checkpoint,
)
from fedcore.federation.server.dp_round import DPFedAvgRound
from fedcore.federation.server.driver import (
    NullReporter,
    Reporter,
    RunOutcome,
    TrainRound,
    plain_train_round,
    run_rounds,
)
from fedcore.federation.server.resume import (  # noqa: F401 - resume_settings: serve's API
    RESUMABLE_CHANGES,
    recorded_settings,
    resume_settings,
)
from fedcore.federation.server.secagg_round import SecAggTrainRound
from fedcore.federation.server.secagg_sums import sums_for
from fedcore.federation.server.strategies import (
    build_strategy,
    restore_strategy_state,
    strategy_state,
)
from fedcore.federation.simulation.batched import grid_for
from fedcore.federation.site.data import data_settings
from fedcore.federation.site.folders import run_sites_dir, simulated_process
from fedcore.mechanisms import Mechanism
from fedcore.models import build_model
from fedcore.privacy import PrivacyLedger
from fedcore.privacy.ledger import FEDERATION_LEDGER_FILE as LEDGER_FILE
from fedcore.protections import Protections, protections_of
from fedcore.report import close_record
from fedcore.runrecord import RecordWriter, RoundRow, Status, record_writer
from fedcore.training import EvalResult, evaluate, pick_device


def initial_model(
    settings: Settings, *, input_shape: tuple[int, ...], num_classes: int
) -> torch.nn.Module:
    """The round-0 global model, seeded by ``settings.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return build_model(settings.model, input_shape=input_shape, num_classes=num_classes)


log = logging.getLogger(__name__)

# How long a server waits for the server of an earlier attempt to let go of the record (a killed
# deployment's ServerApp notices the lost SuperLink within seconds), before it refuses.
WRITER_WAIT = 30.0


def run_server(
    grid: Grid, settings: Settings, out_dir: str | Path, *, reporter: Reporter | None = None
) -> RecordWriter:
    """Run the federation described by ``settings`` on ``grid``; write the run record to ``out_dir``,
    as its one writer (:func:`~fedcore.runrecord.record_writer`; :class:`RecordInUseError` if
    another process keeps writing it)."""
    path = Path(out_dir)
    with record_writer(path, wait=WRITER_WAIT), exiting.writing(path):
        return _serve(grid, settings, path, reporter=reporter)


STOPPED = "stopped from outside (`flwr stop`, or a signal to the server)"


def close_open_records(reason: str = STOPPED) -> list[Path]:
    """Close, as interrupted at their last checkpoint, the records a server in this process is
    still writing, because the process is exiting under it: ``flwr stop`` on a simulation
    SuperLink ends ``flwr-simulation`` while its ServerApp thread waits for replies and never
    sees the exit (:mod:`fedcore.federation.simulation.ray_cleanup` calls this from Flower's exit handler).
    This process holds their writer lock. Returns the records closed."""
    closed = []
    with exiting.exit_closing() as open_records:
        for path in open_records:
            try:
                _close_stopped(path, reason)
                exiting.mark_closed(path)  # the server thread, if it still runs, leaves it so
                closed.append(path)
            except Exception:  # noqa: BLE001 - exiting: close what can be closed, say what could not
                log.exception("could not close the run record %s", path)
    return closed


def _close_stopped(path: Path, reason: str) -> None:
    if _close_at_checkpoint(path, reason=reason, status="interrupted") is None:
        settings = recorded_settings(path)  # stopped before its first round: nothing to resume
        record = RecordWriter.reopen(
            path, settings, rows=[], initial_loss=math.nan, initial_accuracy=math.nan
        )
        close_record(record, status="interrupted", reason=reason)


@dataclass(slots=True)
class _Rounds:
    """How the run trains: the round (plain, DP-FedAvg, secure aggregation), and the federation
    ledger and DP round when a site-level mechanism is on."""

    train_round: TrainRound
    ledger: PrivacyLedger | None = None
    dp_round: DPFedAvgRound | None = None


def _check_persistent(mechanism: Mechanism) -> None:
    """A deployed federation with site-level DP keeps its ledger across runs: with a per-run
    ledger every new run would start the sites' budget at zero again (issue 20, point 5). In
    fedcore's simulation a per-run ledger is allowed, and the summary says it starts at zero."""
    if not mechanism.persistent and not simulated_process():
        raise ConfigError(
            "a deployed run with site-level DP needs 'dp.server.state_dir': the federation "
            "ledger must outlive the run, or every new run would spend the sites' budget afresh"
        )


def train_rounds(
    settings: Settings, protections: Protections, *, dim: int, record_dir: Path
) -> _Rounds:
    """The run's training round, from its protections (the one place the server chooses it)."""
    mechanism, secagg = protections.mechanism, protections.secagg
    rounds = _Rounds(plain_train_round)
    if mechanism is not None:
        _check_persistent(mechanism)
        mechanism.check_before_run(dim=dim, record_dir=record_dir)
        rounds.ledger = mechanism.open_ledger(record_dir)
        if protections.distributed is None:  # distributed DP: the sites add the noise
            rounds.train_round = rounds.dp_round = DPFedAvgRound.create(mechanism, rounds.ledger)
    if secagg is not None:
        sums = sums_for(secagg, mechanism, rounds.dp_round, rounds.ledger)
        rounds.train_round = SecAggTrainRound(settings, secagg=secagg, sums=sums)
    return rounds


def _open_record(
    settings: Settings,
    out_dir: Path,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    device: str,
) -> tuple[RecordWriter, Checkpoint | None]:
    """A new run record, or (``resume``) the one in ``out_dir`` as of its checkpoint."""
    if settings.resume:
        return reopen(out_dir, settings)
    from fedcore.provenance import run_facts

    facts = run_facts(settings, device=device)
    extra = {"input_shape": list(input_shape), "num_classes": num_classes, **facts}
    return RecordWriter(out_dir, settings, extra=extra), None


def _serve(
    grid: Grid, settings: Settings, out_dir: str | Path, *, reporter: Reporter | None
) -> RecordWriter:
    reporter = reporter or NullReporter()
    protections = protections_of(settings)
    holdout, input_shape, num_classes = load_holdout(data_settings(settings))
    model = initial_model(settings, input_shape=input_shape, num_classes=num_classes)
    device = pick_device(settings.device)
    record, resumed = _open_record(
        settings,
        Path(out_dir),
        input_shape=input_shape,
        num_classes=num_classes,
        device=str(device),
    )
    grid = receipts.guard(grid_for(grid, settings), protections, record_dir=record.path)

    def central_eval(arrays: ArrayRecord) -> EvalResult:
        model.load_state_dict(m.record_to_state(arrays))
        return evaluate(model, holdout.x, holdout.y, device=device)

    dim = sum(int(p.numel()) for p in model.state_dict().values())
    rounds = train_rounds(settings, protections, dim=dim, record_dir=record.path)
    strategy = build_strategy(settings)
    initial, resumes = _restore(model, strategy, rounds, resumed)
    checkpoint = _checkpointer(record, rounds, resumes)
    try:
        outcome = run_rounds(
            grid,
            strategy,
            initial=initial,
            rounds=settings.rounds,
            expected_sites=settings.sites,
            timeout=settings.round_timeout,
            config=lambda rnd: m.train_config(
                server_round=rnd,
                num_classes=num_classes,
                input_shape=input_shape,
                run_id=record.run_id,
            ),
            central_eval=central_eval,
            record=record,
            reporter=reporter,
            train_round=rounds.train_round,
            first_round=1 if resumed is None else resumed.round + 1,
            max_failed_rounds=settings.max_failed_rounds,
            checkpoint=checkpoint,
        )
    except BaseException as exc:
        _close_after(record, settings, rounds.ledger, exc)
        raise
    _close_ended(record, settings, rounds.ledger, outcome)
    return record


def _close_ended(
    record: RecordWriter, settings: Settings, ledger: PrivacyLedger | None, outcome: RunOutcome
) -> None:
    """Close the record of a run that ended: failed, stopped (a budget) or completed; not at all
    when the process is exiting under the run (`flwr stop`) and its exit closed the record."""
    if exiting.exit_claims(record.path, wait=exiting.EXIT_WAIT if outcome.failed else 0.0):
        return
    _write_privacy(record, settings, ledger)
    record.save_model(m.record_to_state(outcome.arrays))
    if outcome.failed:
        close_record(record, status="failed", reason=outcome.failed)
    elif outcome.stopped:
        close_record(record, status="stopped", reason=outcome.stopped)
    else:
        close_record(record, status="completed")


def _restore(
    model: torch.nn.Module, strategy: Any, rounds: _Rounds, resumed: Checkpoint | None
) -> tuple[ArrayRecord, int]:
    """The first round's global model and the count of resumes; on resume, the strategy's memory,
    the random state and the clip norm as the checkpoint kept them.

    Secure aggregation needs nothing here: every round draws a fresh random round id, so a resumed
    round is a new session in which the sites train afresh. Without it, a site with record-level
    DP re-sends a round it answered (same fedcore_run_id, round and model)."""
    if resumed is None:
        return m.state_to_record(model.state_dict()), 0
    restore_strategy_state(strategy, resumed.strategy)
    restore_random_state(resumed.random_state)
    if rounds.dp_round is not None and resumed.clip_norm is not None:
        rounds.dp_round.clip_norm = resumed.clip_norm
    return m.state_to_record(resumed.arrays), resumed.resumes + 1


def _checkpointer(record: RecordWriter, rounds: _Rounds, resumes: int) -> Any:
    def checkpoint(server_round: int, arrays: ArrayRecord, strategy: Any) -> None:
        dp_round = rounds.dp_round
        write_checkpoint(
            record.path,
            Checkpoint(
                round=server_round,
                arrays=m.record_to_state(arrays),
                history=[row.to_json() for row in record.rows],
                initial_loss=record.initial_loss,
                initial_accuracy=record.initial_accuracy,
                strategy=strategy_state(strategy),
                clip_norm=None if dp_round is None else dp_round.clip_norm,
                random_state=capture_random_state(),
                resumes=resumes,
            ),
        )

    return checkpoint


def _close_after(
    record: RecordWriter, settings: Settings, ledger: PrivacyLedger | None, exc: BaseException
) -> None:
    """Close the record of a run that raised: as stopped (Flower ends a stopped run with
    KeyboardInterrupt or SystemExit), else as failed; not at all when the process is exiting and
    :func:`close_open_records` closed it already."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        if not exiting.claimed(record.path):
            _close_stopped(record.path, STOPPED)
        return
    if exiting.exit_claims(record.path):
        return
    _write_privacy(record, settings, ledger)
    close_record(record, status="failed", reason=f"{type(exc).__name__}: {exc}")


def reopen(out_dir: Path, settings: Settings) -> tuple[RecordWriter, Checkpoint]:
    """The record in ``out_dir`` as of its checkpoint, and the checkpoint; :class:`ConfigError` if
    the record's settings differ from ``settings`` beyond :data:`RESUMABLE_CHANGES` or it has no
    checkpoint."""
    recorded = recorded_settings(out_dir).to_dict()
    differ = sorted(
        k
        for k, v in settings.to_dict().items()
        if recorded.get(k) != v and k not in RESUMABLE_CHANGES
    )
    if differ:
        raise ConfigError(
            f"cannot resume {str(out_dir)!r}: settings {', '.join(differ)} differ from its config.json"
        )
    checkpoint = read_checkpoint(out_dir)
    if checkpoint is None:
        raise ConfigError(f"{str(out_dir)!r} has no checkpoint to resume from")
    record = _reopen_at(out_dir, settings, checkpoint)
    return record, checkpoint


def _reopen_at(out_dir: Path, settings: Settings, checkpoint: Checkpoint) -> RecordWriter:
    """The record in ``out_dir`` as it was when ``checkpoint`` was written."""
    return RecordWriter.reopen(
        out_dir,
        settings,
        rows=[RoundRow.from_json(row) for row in checkpoint.history],
        initial_loss=checkpoint.initial_loss,
        initial_accuracy=checkpoint.initial_accuracy,
    )


def close_interrupted(out_dir: Path, *, reason: str, status: Status = "interrupted") -> int | None:
    """Close the record of a run that was stopped from outside (a signal; ``status="failed"`` for
    a server process that died): ``history.jsonl`` and ``model.pt`` as of the last completed
    round, plots, summary ``interrupted after round R``.

    Returns R, or None if the run had not written its first checkpoint (nothing to close).
    Raises :class:`RecordInUseError` if a server still writes the record after ``WRITER_WAIT``."""
    if not out_dir.is_dir():
        return None
    with record_writer(out_dir, wait=WRITER_WAIT):
        return _close_at_checkpoint(out_dir, reason=reason, status=status)


def _close_at_checkpoint(out_dir: Path, *, reason: str, status: Status) -> int | None:
    checkpoint = read_checkpoint(out_dir)
    if checkpoint is None:
        return None
    settings = recorded_settings(out_dir)
    record = _reopen_at(out_dir, settings, checkpoint)
    ledger = None
    mechanism = protections_of(settings).mechanism
    if mechanism is not None and (out_dir / LEDGER_FILE).exists():
        ledger = mechanism.open_ledger(out_dir)
    _write_privacy(record, settings, ledger)
    record.save_model(checkpoint.arrays)
    close_record(record, status=status, reason=reason)
    return checkpoint.round


def _write_privacy(record: RecordWriter, settings: Settings, ledger: PrivacyLedger | None) -> None:
    """``privacy.json``: the federation's ledger, the sites' ledgers where this machine holds them
    (simulation), what every site reported each round, the site-level epsilons, the neighbouring
    relation of each and the noise. Written only when some DP is on. Under site-level DP the
    sites' ledgers and per-round reports (which reveal who was sampled) go to ``operator.jsonl``."""
    protections = protections_of(settings)
    if protections.record is None and ledger is None:
        return
    sites = _site_ledgers(settings, protections)
    per_site = [
        {
            "round": row.round,
            "site_epsilon": dict(row.site_epsilon),
            "sites_declined": row.sites_declined,
        }
        for row in record.rows
    ]
    sample_hidden = ledger is not None
    if sample_hidden and protections.record is not None:
        record.write_operator({"privacy_sites": sites, "rounds": per_site})
    doc = {
        **_privacy_claims(protections, ledger),
        "federation": None if ledger is None else ledger.to_json(),
        "sites": {} if sample_hidden else sites,
        "rounds": [
            {
                "round": row.round,
                "server_epsilon": None if ledger is None else row.server_epsilon,
                "server_epsilon_sample_known": row.extra.get("server_epsilon_sample_known"),
                **({} if sample_hidden else {k: v for k, v in per.items() if k != "round"}),
            }
            for row, per in zip(record.rows, per_site, strict=True)
        ],
    }
    record.write_json("privacy.json", doc)


def _site_ledgers(settings: Settings, protections: Protections) -> dict[str, object]:
    """The sites' record-level ledgers this machine holds (simulation), by site id."""
    if protections.record is None:
        return {}
    from fedcore.federation.site.store import SiteStore

    folder = run_sites_dir(settings)
    sites: dict[str, object] = {}
    for path in sorted(folder.glob(SiteStore.LEDGER_GLOB)) if folder.is_dir() else []:
        sites[path.name.split(".")[0].removeprefix("site-")] = json.loads(path.read_text())
    return sites


def _privacy_claims(protections: Protections, ledger: PrivacyLedger | None) -> dict[str, object]:
    """Each budget of ``privacy.json`` with the relation it holds for, and the noise."""
    from fedcore.privacy.noise import MECHANISM

    record, mechanism = protections.record, protections.mechanism
    site_level = ledger is not None and mechanism is not None
    return {
        "accountant": protections.accountant,
        "noise": MECHANISM if mechanism is None else mechanism.noise_description,
        "site_budget": None
        if record is None
        else {"epsilon": record.epsilon, "delta": record.delta},
        "site_neighbouring_relation": None if record is None else record.relation,
        "server_budget": None
        if not site_level
        else {
            "epsilon": ledger.budget.epsilon,
            "delta": ledger.budget.delta,
            "binds": mechanism.budget_against.value,
        },
        "server_mechanism": None if not site_level else mechanism.name,
        "server_neighbouring_relation": None if not site_level else mechanism.relation,
        "server_sample_known_neighbouring_relation": None
        if not site_level
        else mechanism.sample_known_relation,
    }
