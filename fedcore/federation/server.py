"""Everything the ServerApp does, as one library call: :func:`run_server`.

It loads the server's held-out set for central evaluation, builds the initial model (seeded), the
strategy and the run record, runs the rounds, saves the final model and writes the summary. The run
record is finished (summary and plot) also when a round raises, with the status ``failed``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedcore.config import Settings
from fedcore.data import load_holdout
from fedcore.federation import messages as m
from fedcore.federation.dp_server import (
    LEDGER_FILE,
    DPFedAvgRound,
    check_before_run,
    federation_ledger,
)
from fedcore.federation.driver import (
    NullReporter,
    Reporter,
    TrainRound,
    plain_train_round,
    run_rounds,
)
from fedcore.federation.secagg_round import SecAggTrainRound
from fedcore.federation.site_data import data_settings
from fedcore.federation.site_privacy import run_sites_dir
from fedcore.federation.strategies import build_strategy
from fedcore.models import build_model
from fedcore.privacy import PrivacyLedger
from fedcore.runrecord import RunRecord
from fedcore.training import EvalResult, evaluate, pick_device


def initial_model(
    settings: Settings, *, input_shape: tuple[int, ...], num_classes: int
) -> torch.nn.Module:
    """The round-0 global model, seeded by ``settings.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return build_model(settings.model, input_shape=input_shape, num_classes=num_classes)


def run_server(
    grid: Grid, settings: Settings, out_dir: str | Path, *, reporter: Reporter | None = None
) -> RunRecord:
    """Run the federation described by ``settings`` on ``grid``; write the run record to ``out_dir``."""
    reporter = reporter or NullReporter()
    holdout, input_shape, num_classes = load_holdout(data_settings(settings))
    model = initial_model(settings, input_shape=input_shape, num_classes=num_classes)
    device = pick_device(settings.device)
    record = RunRecord(
        out_dir, settings, extra={"input_shape": list(input_shape), "num_classes": num_classes}
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
    try:
        outcome = run_rounds(
            grid,
            build_strategy(settings),
            initial=m.state_to_record(model.state_dict()),
            rounds=settings.rounds,
            expected_sites=settings.sites,
            timeout=settings.round_timeout,
            config=lambda rnd: m.train_config(
                server_round=rnd, num_classes=num_classes, input_shape=input_shape
            ),
            central_eval=central_eval,
            record=record,
            reporter=reporter,
            train_round=train_round,
        )
    except BaseException as exc:
        _write_privacy(record, settings, ledger)
        record.finish(status="failed", reason=f"{type(exc).__name__}: {exc}")
        raise
    _write_privacy(record, settings, ledger)
    record.save_model(m.record_to_state(outcome.arrays))
    if outcome.stopped:
        record.finish(status="stopped", reason=outcome.stopped)
    else:
        record.finish(status="completed")
    return record


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
