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
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedcore.config import Settings
from fedcore.data import load_holdout
from fedcore.errors import ConfigError
from fedcore.federation import messages as m
from fedcore.federation.server.checkpoint import (
    Checkpoint,
    capture_random_state,
    read_checkpoint,
    restore_random_state,
    write_checkpoint,
)
from fedcore.federation.server.dp_round import (
    LEDGER_FILE,
    DPFedAvgRound,
    check_before_run,
    federation_ledger,
)
from fedcore.federation.server.driver import (
    NullReporter,
    Reporter,
    TrainRound,
    plain_train_round,
    run_rounds,
)
from fedcore.federation.server.secagg_round import SecAggTrainRound
from fedcore.federation.server.strategies import (
    build_strategy,
    restore_strategy_state,
    strategy_state,
)
from fedcore.federation.simulation.batched import grid_for
from fedcore.federation.site.data import data_settings
from fedcore.federation.site.folders import run_sites_dir
from fedcore.models import build_model
from fedcore.privacy import PrivacyLedger
from fedcore.runrecord import RoundRow, RunRecord, Status, record_writer
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
) -> RunRecord:
    """Run the federation described by ``settings`` on ``grid``; write the run record to ``out_dir``,
    as its one writer (:func:`~fedcore.runrecord.record_writer`; :class:`RecordInUseError` if
    another process keeps writing it)."""
    path = Path(out_dir)
    with record_writer(path, wait=WRITER_WAIT):
        _writing.add(path)
        try:
            return _serve(grid, settings, path, reporter=reporter)
        finally:
            _writing.discard(path)
            _closed_on_exit.discard(path)


STOPPED = "stopped from outside (`flwr stop`, or a signal to the server)"
_writing: set[Path] = set()  # the records run_server is writing in this process
_closed_on_exit: set[Path] = set()  # ... and those close_open_records closed under it


def close_open_records(reason: str = STOPPED) -> list[Path]:
    """Close, as interrupted at their last checkpoint, the records a server in this process is
    still writing, because the process is exiting under it: ``flwr stop`` on a simulation
    SuperLink ends ``flwr-simulation`` while its ServerApp thread waits for replies and never
    sees the exit (:mod:`fedcore.federation.simulation.ray_cleanup` calls this from Flower's exit handler).
    This process holds their writer lock. Returns the records closed."""
    closed = []
    for path in list(_writing):
        try:
            _close_stopped(path, reason)
            _closed_on_exit.add(path)  # the server thread, if it still runs, leaves it so
            closed.append(path)
        except Exception:  # noqa: BLE001 - exiting: close what can be closed, say what could not
            log.exception("could not close the run record %s", path)
    return closed


def _close_stopped(path: Path, reason: str) -> None:
    if _close_at_checkpoint(path, reason=reason, status="interrupted") is None:
        settings = recorded_settings(path)  # stopped before its first round: nothing to resume
        RunRecord.reopen(
            path, settings, rows=[], initial_loss=math.nan, initial_accuracy=math.nan
        ).finish(status="interrupted", reason=reason)


def _serve(
    grid: Grid, settings: Settings, out_dir: str | Path, *, reporter: Reporter | None
) -> RunRecord:
    reporter = reporter or NullReporter()
    grid = grid_for(grid, settings)  # many sites per simulated node (fedcore.federation.simulation.batched)
    holdout, input_shape, num_classes = load_holdout(data_settings(settings))
    model = initial_model(settings, input_shape=input_shape, num_classes=num_classes)
    device = pick_device(settings.device)
    resumed: Checkpoint | None = None
    if settings.resume:
        record, resumed = reopen(Path(out_dir), settings)
    else:
        from fedcore.provenance import run_facts

        record = RunRecord(
            out_dir,
            settings,
            extra={
                "input_shape": list(input_shape),
                "num_classes": num_classes,
                **run_facts(settings, device=str(device)),
            },
        )

    def central_eval(arrays: ArrayRecord) -> EvalResult:
        model.load_state_dict(m.record_to_state(arrays))
        return evaluate(model, holdout.x, holdout.y, device=device)

    train_round: TrainRound = plain_train_round
    ledger, dp_round = None, None
    if settings.dp.server.epsilon is not None:
        dim = sum(int(p.numel()) for p in model.state_dict().values())
        check_before_run(settings, dim=dim, record_dir=record.path)
        ledger = federation_ledger(settings, record.path / LEDGER_FILE)
        train_round = dp_round = DPFedAvgRound.create(settings, ledger)
    if settings.secagg.enabled:
        train_round = SecAggTrainRound(settings, dp=dp_round)
    strategy = build_strategy(settings)
    initial = m.state_to_record(model.state_dict())
    resumes = 0
    if resumed is not None:
        # Secure aggregation needs nothing here: every round draws a fresh random round id, so a
        # resumed round is a new session in which the sites train afresh. Without it, a site with
        # record-level DP re-sends a round it answered (same fedcore_run_id, round and model).
        initial = m.state_to_record(resumed.arrays)
        restore_strategy_state(strategy, resumed.strategy)
        restore_random_state(resumed.random_state)
        if dp_round is not None and resumed.clip_norm is not None:
            dp_round.clip_norm = resumed.clip_norm
        resumes = resumed.resumes + 1

    def checkpoint(server_round: int, arrays: ArrayRecord, strategy: Any) -> None:
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
            train_round=train_round,
            first_round=1 if resumed is None else resumed.round + 1,
            max_failed_rounds=settings.max_failed_rounds,
            checkpoint=checkpoint,
        )
    except BaseException as exc:
        if record.path in _closed_on_exit:  # the process is exiting; the record is closed
            raise
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # how Flower ends a stopped run
            _close_stopped(record.path, STOPPED)
            raise
        _write_privacy(record, settings, ledger)
        record.finish(status="failed", reason=f"{type(exc).__name__}: {exc}")
        raise
    _write_privacy(record, settings, ledger)
    record.save_model(m.record_to_state(outcome.arrays))
    if outcome.failed:
        record.finish(status="failed", reason=outcome.failed)
    elif outcome.stopped:
        record.finish(status="stopped", reason=outcome.stopped)
    else:
        record.finish(status="completed")
    return record


# Settings a resumed run may change: how it runs here, not what the federation computes.
RESUMABLE_CHANGES = frozenset(
    {
        "round_timeout",
        "client_cpus",
        "client_gpus",
        "device",
        "max_failed_rounds",
        "secagg.timeout",
        "out",
        "resume",
        "rounds",
        "ray_address",
        "simulation.sites_per_node",
    }
)


def recorded_settings(out_dir: Path) -> Settings:
    """The settings in ``out_dir/config.json``; :class:`ConfigError` if there is no readable record."""
    from fedcore.config import resolve

    try:
        config = json.loads((out_dir / "config.json").read_text())
        values = config["settings"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{str(out_dir)!r} holds no run record to resume ({exc})") from exc
    return resolve(values={k: v for k, v in values.items() if k != "resume"})


def resume_settings(out_dir: Path, overrides: dict[str, Any]) -> Settings:
    """The settings of the record in ``out_dir`` with ``overrides`` (flat ``{key: value}``) applied,
    ``resume`` and ``out`` set. Raises :class:`ConfigError` for an override that would change what
    the federation computes, and for growing ``rounds`` when a noise multiplier is calibrated over
    the rounds."""
    from fedcore.config import resolve

    recorded = recorded_settings(out_dir)
    before = recorded.to_dict()
    changed = {k: v for k, v in overrides.items() if before.get(k) != v}
    refused = sorted(set(changed) - RESUMABLE_CHANGES)
    if refused:
        raise ConfigError(
            f"cannot resume with {', '.join(f'{k}={changed[k]!r}' for k in refused)}: it changes "
            f"what the federation computes (recorded: "
            f"{', '.join(f'{k}={before.get(k)!r}' for k in refused)}); start a new run instead"
        )
    calibrated = (
        recorded.dp.site.epsilon is not None and recorded.dp.site.noise_multiplier is None
    ) or (recorded.dp.server.epsilon is not None and recorded.dp.server.noise_multiplier is None)
    if "rounds" in changed and calibrated:
        raise ConfigError(
            "cannot resume with a different 'rounds': the DP noise multiplier was calibrated over "
            f"{recorded.rounds} rounds"
        )
    values = {k: v for k, v in before.items() if v is not None}
    values.update({k: v for k, v in overrides.items() if v is not None})
    values.update({"out": str(out_dir), "resume": True})
    return resolve(values=values)


def reopen(out_dir: Path, settings: Settings) -> tuple[RunRecord, Checkpoint]:
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


def _reopen_at(out_dir: Path, settings: Settings, checkpoint: Checkpoint) -> RunRecord:
    """The record in ``out_dir`` as it was when ``checkpoint`` was written."""
    return RunRecord.reopen(
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
    if settings.dp.server.epsilon is not None and (out_dir / LEDGER_FILE).exists():
        ledger = federation_ledger(settings, out_dir / LEDGER_FILE)
    _write_privacy(record, settings, ledger)
    record.save_model(checkpoint.arrays)
    record.finish(status=status, reason=reason)
    return checkpoint.round


def _write_privacy(record: RunRecord, settings: Settings, ledger: PrivacyLedger | None) -> None:
    """``privacy.json``: the federation's ledger, the sites' ledgers where this machine holds them
    (simulation), what every site reported each round, both site-level epsilons, the neighbouring
    relation of each mechanism and the noise. Written only when some DP is on. Under site-level DP
    the sites' ledgers and per-round reports (which reveal who was sampled) go to ``operator.jsonl``."""
    if settings.dp.site.epsilon is None and ledger is None:
        return
    from fedcore.privacy.noise import MECHANISM

    sites: dict[str, object] = {}
    if settings.dp.site.epsilon is not None:
        folder = run_sites_dir(settings)
        for path in sorted(folder.glob("site-*.ledger.json")) if folder.is_dir() else []:
            sites[path.name.split(".")[0].removeprefix("site-")] = json.loads(path.read_text())
    per_site = [
        {
            "round": row.round,
            "site_epsilon": dict(row.site_epsilon),
            "sites_declined": row.sites_declined,
        }
        for row in record.rows
    ]
    sample_hidden = ledger is not None
    if sample_hidden and settings.dp.site.epsilon is not None:
        record.write_operator({"privacy_sites": sites, "rounds": per_site})
    doc = {
        "accountant": settings.dp.accountant,
        "noise": MECHANISM,
        "site_budget": None
        if settings.dp.site.epsilon is None
        else {"epsilon": settings.dp.site.epsilon, "delta": settings.dp.site.delta},
        "site_neighbouring_relation": None
        if settings.dp.site.epsilon is None
        else "add or remove one training record of a site (the site reports weight 1, not its "
        "example count)",
        "server_budget": None
        if ledger is None
        else {
            "epsilon": ledger.budget.epsilon,
            "delta": ledger.budget.delta,
            "binds": settings.dp.server.budget_against,
        },
        "server_neighbouring_relation": None if ledger is None else "add or remove one whole site",
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
