"""What an experiment's runs produced: ``results.csv`` (one row per run) and ``summary.md``.

A run record is read tolerantly, since its fields change with fedcore's privacy work: any field
may be absent. The epsilon columns, each named for the observer it holds against:

- ``record_epsilon``: record-level (DP-SGD), the largest ``site_epsilon`` any site reported;
  against anyone who sees a site's updates, the server included.
- ``server_epsilon``: site-level (DP-FedAvg), against observers of the released models who do
  not know which sites were sampled (amplification by subsampling).
- ``server_epsilon_sample_known``: site-level, against observers who know which sites took part
  (no amplification); present when the run record has it.
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

from fedcore.experiment.plan import Point, display, resolved_settings
from fedcore.experiment.runner import AUDIT, LOGS, PointOutcome, read_outcome, run_dir
from fedcore.experiment.spec import ExperimentSpec

EPSILON_COLUMNS = ("record_epsilon", "server_epsilon", "server_epsilon_sample_known")
METRIC_COLUMNS = (
    "final_accuracy",
    "best_accuracy",
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
    audit_epsilon_formal: float | None = None
    audit_epsilon_lower_bound: float | None = None
    audit_control_epsilon_lower_bound: float | None = None

    def value(self, column: str) -> Any:
        return getattr(self, column)


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


def read_run(point: Point, *, out: Path) -> RunResult:
    """The result of one point from its run record (absent fields are None)."""
    folder = run_dir(out, point.run_id)
    outcome: PointOutcome | None = read_outcome(out, point.run_id)
    rows: list[dict[str, Any]] = []
    try:
        for line in (folder / "history.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
    except (OSError, ValueError):
        pass
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
    sample_known = _last([r.server_epsilon_sample_known for r in per_round])
    if sample_known is None:
        sample_known = _privacy_json_sample_known(folder)
    audit = _audit(out, point)
    accuracies = [a for a in (_number(r.get("eval_accuracy")) for r in rows) if a is not None]
    planned = point.settings.get("rounds")
    return RunResult(
        point=point,
        final_accuracy=_number(rows[-1].get("eval_accuracy")) if rows else None,
        best_accuracy=max(accuracies) if accuracies else None,
        record_epsilon=running_record,
        server_epsilon=_last([r.server_epsilon for r in per_round]),
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


def _privacy_json_sample_known(folder: Path) -> float | None:
    try:
        doc = json.loads((folder / "privacy.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
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

    def __str__(self) -> str:
        if self.half_width is None:
            return f"{self.mean:.4g}"
        return f"{self.mean:.4g} ± {self.half_width:.2g}"


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


def differing_settings(points: Sequence[Point]) -> dict[str, list[str]]:
    """Every setting (after defaults) that does not take one value at every point."""
    resolved = [resolved_settings(p) for p in points]
    keys = sorted({k for s in resolved for k in s} - {"out"})
    differing: dict[str, list[str]] = {}
    for key in keys:
        values = sorted({display(s.get(key)) or "unset" for s in resolved})
        if len(values) > 1:
            differing[key] = values
    return differing


def write_summary(
    results: Sequence[RunResult], spec: ExperimentSpec, path: Path, *, plots: Sequence[str]
) -> None:
    """``summary.md``: what was run, one row per point (means and intervals over seeds), the
    settings that differ between points, the runs that did not complete, the plots."""
    lines = _summary_preamble(results, spec)
    lines += ["", "## Results", "", *_results_table(results, spec)]
    lines += ["", "## Settings that differ between points", "", *_differences(results, spec)]
    unusual = [
        r
        for r in results
        if r.returncode is not None and (not r.finished or r.rounds_completed != r.rounds_planned)
    ]
    if unusual:
        lines += ["", "## Runs that did not complete every round", ""]
        lines += [f"- `{r.point.run_id}`: {r.status}" for r in unusual]
    if plots:
        lines += ["", "## Plots", ""] + [f"- `{p}`" for p in plots]
    path.write_text("\n".join(lines) + "\n")


EPSILONS_NOTE = (
    "- **Epsilons**: `record ε` is record-level DP-SGD (largest over sites) against anyone who "
    "sees a site's updates; `server ε` is site-level DP-FedAvg against observers of the released "
    "models who do not know which sites were sampled; `server ε (sample known)` holds against "
    "observers who know which sites took part (blank where the run record does not give it)."
)
AUDIT_NOTE = (
    "- **Audit**: each record-level point's settings were also audited with `fedcore audit` "
    "(a one-run lower bound on the record-level ε at 95 % confidence, from a separate "
    "training of site 0 with gradient canaries; the control is the same audit without noise, "
    "which must exceed the formal ε for the audit to mean anything)."
)


def _summary_preamble(results: Sequence[RunResult], spec: ExperimentSpec) -> list[str]:
    """The title, the description, and what the counts, intervals and epsilons mean."""
    lines = [f"# Experiment `{spec.name}`" + (" (--quick)" if spec.quick else ""), ""]
    if spec.description:
        lines += [spec.description, ""]
    finished = [r for r in results if r.finished]
    complete = [r for r in finished if r.rounds_completed == r.rounds_planned]
    lines += [
        f"- **Runs**: {len(results)} planned, {len(finished)} finished, "
        f"{len(complete)} with every round",
        f"- **Seeds per point**: {len(spec.axis('seed') or (None,))}; "
        f"intervals are means ± the {CONFIDENCE:.0%} Student-t confidence half-width over seeds",
        EPSILONS_NOTE,
    ]
    if spec.audit:
        lines.append(AUDIT_NOTE)
    return lines


def _interval_cell(values: Sequence[float | None]) -> str:
    interval = mean_interval(values)
    return "-" if interval is None else str(interval)


def _results_table(results: Sequence[RunResult], spec: ExperimentSpec) -> list[str]:
    """One row per point (its seeds grouped): accuracies, epsilons, rounds, seconds, audits."""
    axes = [name for name, _ in spec.axes if name != "seed"]
    header = [*axes, "runs", "final accuracy", "best accuracy", "record ε", "server ε"]
    header += ["server ε (sample known)", "rounds", "s/run"]
    if spec.audit:
        header += ["audit: ε lower bound", "audit: control"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, runs in groups(results).items():
        cells = [v or "-" for _, v in key]
        cells.append(str(len([r for r in runs if r.finished])))
        for column in ("final_accuracy", "best_accuracy", *EPSILON_COLUMNS):
            cells.append(_interval_cell([r.value(column) for r in runs]))
        cells.append(", ".join(sorted({f"{r.rounds_completed}/{r.rounds_planned}" for r in runs})))
        secs = mean_interval([r.seconds for r in runs])
        cells.append("-" if secs is None else f"{secs.mean:.0f}")
        if spec.audit:
            cells += [_interval_cell([r.value(c) for r in runs]) for c in AUDIT_COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _differences(results: Sequence[RunResult], spec: ExperimentSpec) -> list[str]:
    """The settings that take more than one value across the points, and why."""
    differing = differing_settings([r.point for r in results])
    swept = {name for name, _ in spec.axes}
    lines: list[str] = []
    if differing:
        lines += ["| setting | values | why |", "|---|---|---|"]
        for setting, values in differing.items():
            why = "axis" if setting in swept else _why(setting, spec)
            lines.append(f"| `{setting}` | {', '.join(values)} | {why} |")
    else:
        lines.append("None: every point ran with the same settings.")
    lines += [
        "",
        "Every other setting is the same at every point (`[base]` of `spec.toml`, then "
        "fedcore's defaults).",
    ]
    return lines


def _why(key: str, spec: ExperimentSpec) -> str:
    owners = [m.value for m, table in spec.per_mode.items() if key in table]
    if owners:
        return f"`[modes.{']`, `[modes.'.join(owners)}]`"
    return "set by the mode"


def collect(points: Sequence[Point], *, out: Path) -> list[RunResult]:
    return [read_run(p, out=out) for p in points]
