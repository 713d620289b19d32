"""What an experiment's runs produced: ``results.csv`` (one row per run) and ``summary.md``.

A run record is read tolerantly, since its fields change with fedcore's privacy work: any field
may be absent. The epsilon columns, each named for the observer it holds against:

- ``record_epsilon``: record-level (DP-SGD), the largest ``site_epsilon`` any site reported;
  against anyone who sees a site's updates, the server included.
- ``server_epsilon``: site-level (DP-FedAvg), against observers of the released models who do
  not know which sites were sampled (amplification by subsampling).
- ``server_epsilon_sample_known``: site-level, against observers who know which sites took part
  (no amplification); present when the run record has it. Under distributed DP (mode
  ``distributed``) the federation's ``server_epsilon`` claims no amplification (it holds against
  the server, which knows the sample), so both columns hold it.

``epsilon_spent`` is the epsilon the point's mode binds (record-level for ``record``, site-level otherwise),
and ``delta``, ``noise_multiplier``, ``sampling_rate`` and ``steps`` are that mechanism's
(:mod:`fedcore.experiment.dp_parameters`). ``summary.md`` is :mod:`fedcore.experiment.summary`.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcore.experiment.dp_parameters import NO_DP, DPParameters, Level, read_dp_parameters
from fedcore.experiment.plan import Point, display, resolved_settings
from fedcore.experiment.runner import AUDIT, LOGS, PointOutcome, read_outcome, run_dir
from fedcore.experiment.spec import MODE_AXIS, ExperimentSpec, Mode

EPSILON_COLUMNS = ("record_epsilon", "server_epsilon", "server_epsilon_sample_known")
MECHANISM_COLUMNS = ("epsilon_spent", "delta", "noise_multiplier", "sampling_rate", "steps")
METRIC_COLUMNS = (
    "final_accuracy",
    "best_accuracy",
    *MECHANISM_COLUMNS,
    *EPSILON_COLUMNS,
    "rounds_completed",
    "rounds_planned",
    "seconds",
    "status",
    "returncode",
    "run_dir",
)
AUDIT_COLUMNS = (
    "audit_epsilon_formal",
    "audit_epsilon_lower_bound",
    "audit_control_epsilon_lower_bound",
)
CONFIDENCE = 0.95
DISTRIBUTED_MECHANISM = "distributed"  # privacy.json's server_mechanism under distributed DP
CSPRNG_NOTE = "DP noise is drawn from a CSPRNG: runs differ at a fixed seed"


@dataclass(frozen=True, slots=True)
class RoundEpsilon:
    round: int
    record_epsilon: float | None
    server_epsilon: float | None
    server_epsilon_sample_known: float | None


@dataclass(frozen=True, slots=True)
class RunResult:
    point: Point
    final_accuracy: float | None
    best_accuracy: float | None
    record_epsilon: float | None
    server_epsilon: float | None
    server_epsilon_sample_known: float | None
    rounds_completed: int
    rounds_planned: int
    seconds: float | None
    status: str
    returncode: int | None
    run_dir: str
    finished: bool = False  # a result a rerun keeps (not "not run", not stopped by a signal)
    per_round: tuple[RoundEpsilon, ...] = field(default=())
    accuracy_per_round: tuple[float | None, ...] = field(default=())  # rounds 1..R, central
    mechanism: DPParameters = NO_DP  # of the binding epsilon's mechanism
    audit_epsilon_formal: float | None = None
    audit_epsilon_lower_bound: float | None = None
    audit_control_epsilon_lower_bound: float | None = None

    def value(self, column: str) -> Any:
        if column in MECHANISM_COLUMNS[1:]:
            return getattr(self.mechanism, column)
        return getattr(self, column)

    @property
    def level(self) -> Level:
        """Whose epsilon the point's budget binds: ``"record"`` (DP-SGD at the sites) for mode
        ``record`` (or, without a mode axis, a run that reports a record-level epsilon), else
        ``"server"`` (DP-FedAvg)."""
        return bound_level(self.point, record_reported=self.record_epsilon is not None)

    @property
    def epsilon_spent(self) -> float | None:
        """The epsilon spent that the point's budget binds (:attr:`level`)."""
        return self.record_epsilon if self.level == "record" else self.server_epsilon


def bound_level(point: Point, *, record_reported: bool) -> Level:
    """Whose epsilon ``point``'s budget binds (:attr:`RunResult.level`)."""
    mode = point.swept.get(MODE_AXIS)
    if mode is Mode.RECORD or (mode is None and record_reported):
        return "record"
    return "server"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _max_site(value: Any) -> float | None:
    if isinstance(value, Mapping):
        found = [v for v in (_number(x) for x in value.values()) if v is not None]
        return max(found) if found else None
    return _number(value)


def _last(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return present[-1] if present else None


def _history(folder: Path) -> list[dict[str, Any]]:
    """The rows of ``history.jsonl`` that parse as objects (none if it is absent or torn)."""
    rows: list[dict[str, Any]] = []
    try:
        for line in (folder / "history.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
    except (OSError, ValueError):
        pass
    return rows


def _round_epsilons(rows: Sequence[Mapping[str, Any]]) -> list[RoundEpsilon]:
    """Each round's epsilons; the record-level one the largest any site has reported so far."""
    per_round: list[RoundEpsilon] = []
    running_record: float | None = None
    for i, row in enumerate(rows, start=1):
        site = _max_site(row.get("site_epsilon"))
        if site is not None:  # a site's epsilon only grows; a round it skipped keeps the last
            running_record = site if running_record is None else max(running_record, site)
        per_round.append(
            RoundEpsilon(
                round=int(row.get("round", i)),
                record_epsilon=running_record,
                server_epsilon=_number(row.get("server_epsilon")),
                server_epsilon_sample_known=_number(row.get("server_epsilon_sample_known")),
            )
        )
    return per_round


def read_run(point: Point, *, out: Path) -> RunResult:
    """The result of one point from its run record (absent fields are None)."""
    folder = run_dir(out, point.run_id)
    outcome: PointOutcome | None = read_outcome(out, point.run_id)
    rows = _history(folder)
    per_round = _round_epsilons(rows)
    running_record = per_round[-1].record_epsilon if per_round else None
    server_epsilon = _last([r.server_epsilon for r in per_round])
    sample_known = _last([r.server_epsilon_sample_known for r in per_round])
    if sample_known is None:
        sample_known = _privacy_json_sample_known(folder, server_epsilon=server_epsilon)
    audit = _audit(out, point)
    per_round_accuracy = tuple(_number(r.get("eval_accuracy")) for r in rows)
    accuracies = [a for a in per_round_accuracy if a is not None]
    planned = point.settings.get("rounds")
    level = bound_level(point, record_reported=running_record is not None)
    return RunResult(
        point=point,
        final_accuracy=per_round_accuracy[-1] if rows else None,
        best_accuracy=max(accuracies) if accuracies else None,
        record_epsilon=running_record,
        server_epsilon=server_epsilon,
        server_epsilon_sample_known=sample_known,
        rounds_completed=len(rows),
        rounds_planned=int(planned)
        if isinstance(planned, int)
        else int(resolved_settings(point)["rounds"]),
        seconds=round(outcome.seconds, 1) if outcome else None,
        status=_status(folder, outcome),
        returncode=outcome.returncode if outcome else None,
        finished=outcome is not None and outcome.finished,
        run_dir=str(folder),
        per_round=tuple(per_round),
        accuracy_per_round=per_round_accuracy,
        mechanism=read_dp_parameters(folder, level=level) if point.has_dp else NO_DP,
        audit_epsilon_formal=_number(audit.get("epsilon_formal")),
        audit_epsilon_lower_bound=_number(audit.get("epsilon_lower_bound")),
        audit_control_epsilon_lower_bound=_number(
            (audit.get("control") or {}).get("epsilon_lower_bound")
        ),
    )


def _audit(out: Path, point: Point) -> dict[str, Any]:
    try:
        doc = json.loads((run_dir(out, point.run_id, AUDIT) / "audit.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _privacy_json_sample_known(folder: Path, *, server_epsilon: float | None) -> float | None:
    """The sample-known epsilon from ``privacy.json``; under distributed DP the federation's
    ``server_epsilon`` itself, which holds against the server (it knows the sample)."""
    try:
        doc = json.loads((folder / "privacy.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    if doc.get("server_mechanism") == DISTRIBUTED_MECHANISM:
        return server_epsilon
    value = _number(doc.get("server_epsilon_sample_known"))
    if value is None and isinstance(doc.get("rounds"), list):
        value = _last(
            [
                _number(r.get("server_epsilon_sample_known"))
                for r in doc["rounds"]
                if isinstance(r, dict)
            ]
        )
    return value


def _status(folder: Path, outcome: PointOutcome | None) -> str:
    if outcome is None:
        return "not run"
    if not outcome.finished:
        return (
            f"stopped by a signal (exit {outcome.returncode}); "
            "rerunning the experiment runs it again"
        )
    try:
        for line in (folder / "summary.md").read_text().splitlines():
            if line.startswith("- **Status**:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"fedcore simulate exited {outcome.returncode} (see {LOGS}/{folder.name}.log)"


def write_csv(results: Sequence[RunResult], spec: ExperimentSpec, path: Path) -> None:
    """One row per run: ``run_id``, every axis, then :data:`METRIC_COLUMNS`."""
    axes = [name for name, _ in spec.axes]
    columns = [*METRIC_COLUMNS, *(AUDIT_COLUMNS if spec.audit else ())]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["run_id", *axes, *columns])
        for r in results:
            cells = [r.point.run_id, *(display(r.point.swept.get(a)) for a in axes)]
            cells += ["" if r.value(c) is None else r.value(c) for c in columns]
            writer.writerow(cells)


@dataclass(frozen=True, slots=True)
class Interval:
    mean: float
    half_width: float | None  # None: fewer than two values
    n: int

    def text(self, decimals: int = 3) -> str:
        """``mean ± half-width``, both to ``decimals`` places (the mean alone for one value, or a
        half-width that rounds to zero)."""
        if self.half_width is None or round(self.half_width, decimals) == 0:
            return f"{self.mean:.{decimals}f}"
        return f"{self.mean:.{decimals}f} ± {self.half_width:.{decimals}f}"

    def __str__(self) -> str:
        return self.text()


def mean_interval(
    values: Sequence[float | None], *, confidence: float = CONFIDENCE
) -> Interval | None:
    """Mean and Student-t confidence half-width of the present values (None if there are none)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    mean = statistics.fmean(present)
    if len(present) < 2:
        return Interval(mean, None, 1)
    from scipy import stats

    t = float(stats.t.ppf(0.5 + confidence / 2, len(present) - 1))
    return Interval(mean, t * statistics.stdev(present) / math.sqrt(len(present)), len(present))


def groups(results: Sequence[RunResult]) -> dict[tuple[tuple[str, str], ...], list[RunResult]]:
    """Runs that differ only in their seed, in plan order."""
    out: dict[tuple[tuple[str, str], ...], list[RunResult]] = {}
    for r in results:
        out.setdefault(r.point.group_key(), []).append(r)
    return out


def collect(points: Sequence[Point], *, out: Path) -> list[RunResult]:
    return [read_run(p, out=out) for p in points]
