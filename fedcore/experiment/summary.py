"""``summary.md``: an experiment's results as a person (or a paper) reads them.

- **Results**: one row per point (its seeds grouped), in the form a paper reports a DP result:
  the epsilon the point's budget binds, its delta, the noise multiplier, the sampling rate and the
  steps of that mechanism (:mod:`fedcore.experiment.dp_parameters`), then the central accuracy as
  a mean with its 95 % Student-t interval over seeds. Every column has one precision.
- **Epsilon against each observer**: the record-level and site-level epsilons side by side (and
  the audits' bounds with ``audit = true``).
- the settings that differ between points, and why; the runs that did not complete; the plots.

Where any point trains with DP, the summary says that DP noise is drawn from a CSPRNG, so a rerun
at the same seed does not reproduce its accuracies (:data:`~fedcore.experiment.results.CSPRNG_NOTE`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedcore.experiment.plan import Point, display, resolved_settings
from fedcore.experiment.results import (
    AUDIT_COLUMNS,
    CONFIDENCE,
    CSPRNG_NOTE,
    EPSILON_COLUMNS,
    RunResult,
    groups,
    mean_interval,
)
from fedcore.experiment.spec import ExperimentSpec

ACCURACY_DECIMALS = 3
EPSILON_DECIMALS = 3
NOISE_DECIMALS = 3
RATE_DECIMALS = 4

EPSILONS_NOTE = (
    "- **Epsilons**: `record ε` is record-level DP-SGD (largest over sites) against anyone who "
    "sees a site's updates; `server ε` is site-level DP-FedAvg against observers of the released "
    "models who do not know which sites were sampled; `server ε (sample known)` holds against "
    "observers who know which sites took part (`-` where the run record does not give it). "
    "Under `distributed` the sites' own noise makes the sum private against the server itself, "
    "which knows the sample: both columns hold that one epsilon."
)
MECHANISM_NOTE = (
    "`ε spent` is the epsilon that the point's budget binds (record-level for `record`, "
    "site-level for `site`, `site-secagg` and `distributed`), at `δ`. `noise multiplier`, "
    "`sampling rate` and `steps` are that mechanism's: for record-level DP-SGD those of the site "
    "with the largest ε (the Poisson rate of its batches, its DP-SGD steps over the run); for "
    "site-level DP-FedAvg the server's (the rate at which sites are sampled, the rounds charged); "
    "for distributed DP the summed noise of the honest noisers over the sum's L2 sensitivity "
    "(sampling rate 1: no amplification is claimed against the server). Accuracies are "
    "central, on the server's held-out set: mean ± the 95 % Student-t half-width over seeds. "
    "A value that differs between the seeds of a point is shown as its range."
)
AUDIT_NOTE = (
    "- **Audit**: each record-level point's settings were also audited with `fedcore audit` "
    "(a one-run lower bound on the record-level ε at 95 % confidence, from a separate "
    "training of site 0 with gradient canaries; the control is the same audit without noise, "
    "which must exceed the formal ε for the audit to mean anything)."
)


def write_summary(
    results: Sequence[RunResult], spec: ExperimentSpec, path: Path, *, plots: Sequence[str]
) -> None:
    """``summary.md``: what was run, one row per point (means and intervals over seeds), the
    epsilons against each observer, the settings that differ between points, the runs that did
    not complete, the plots."""
    lines = _preamble(results, spec)
    lines += ["", "## Results", "", *results_table(results, spec), "", MECHANISM_NOTE]
    lines += ["", "## Epsilon against each observer", "", *_epsilons_table(results, spec)]
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


def _preamble(results: Sequence[RunResult], spec: ExperimentSpec) -> list[str]:
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
    if any(r.point.has_dp for r in results):
        lines.append(
            f"- **Reproducibility**: {CSPRNG_NOTE}. The seed fixes the data split, the partition "
            "and the initial model; the DP noise (and DP-SGD's Poisson batches) come from the "
            "operating system's CSPRNG by design, so a rerun at the same seed does not reproduce "
            "a DP point's accuracies. The intervals over seeds include this variation."
        )
    if spec.audit:
        lines.append(AUDIT_NOTE)
    return lines


def interval_cell(values: Sequence[float | None], *, decimals: int) -> str:
    """Mean ± 95 % half-width at ``decimals`` places, or ``-`` when there is no value."""
    interval = mean_interval(values)
    return "-" if interval is None else interval.text(decimals)


def range_cell(values: Sequence[float | int | None], *, decimals: int) -> str:
    """The one value at ``decimals`` places, the range ``low–high`` where the seeds differ, or
    ``-`` when there is none."""
    present = sorted({f"{v:.{decimals}f}" for v in values if v is not None}, key=float)
    if not present:
        return "-"
    return present[0] if len(present) == 1 else f"{present[0]}–{present[-1]}"


def _delta_cell(values: Sequence[float | None]) -> str:
    present = sorted({f"{v:g}" for v in values if v is not None}, key=float)
    return ", ".join(present) or "-"


def _point_cells(key: tuple[tuple[str, str], ...], runs: Sequence[RunResult]) -> list[str]:
    return [*(v or "-" for _, v in key), str(len([r for r in runs if r.finished]))]


def results_table(results: Sequence[RunResult], spec: ExperimentSpec) -> list[str]:
    """One row per point (its seeds grouped): the binding epsilon and its mechanism, the
    accuracies, the rounds (a Markdown table, one precision per column)."""
    axes = [name for name, _ in spec.axes if name != "seed"]
    header = [*axes, "runs", "ε spent", "δ", "noise multiplier", "sampling rate", "steps"]
    header += ["final accuracy", "best accuracy", "rounds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, runs in groups(results).items():
        cells = _point_cells(key, runs)
        cells.append(interval_cell([r.epsilon_spent for r in runs], decimals=EPSILON_DECIMALS))
        cells.append(_delta_cell([r.mechanism.delta for r in runs]))
        cells.append(
            range_cell([r.mechanism.noise_multiplier for r in runs], decimals=NOISE_DECIMALS)
        )
        cells.append(range_cell([r.mechanism.sampling_rate for r in runs], decimals=RATE_DECIMALS))
        cells.append(range_cell([r.mechanism.steps for r in runs], decimals=0))
        for column in ("final_accuracy", "best_accuracy"):
            values = [r.value(column) for r in runs]
            cells.append(interval_cell(values, decimals=ACCURACY_DECIMALS))
        cells.append(", ".join(sorted({f"{r.rounds_completed}/{r.rounds_planned}" for r in runs})))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _epsilons_table(results: Sequence[RunResult], spec: ExperimentSpec) -> list[str]:
    """One row per point: the epsilon against each observer, seconds per run, the audits."""
    axes = [name for name, _ in spec.axes if name != "seed"]
    header = [*axes, "runs", "record ε", "server ε", "server ε (sample known)", "s/run"]
    if spec.audit:
        header += ["audit: ε lower bound", "audit: control"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, runs in groups(results).items():
        cells = _point_cells(key, runs)
        for column in EPSILON_COLUMNS:
            values = [r.value(column) for r in runs]
            cells.append(interval_cell(values, decimals=EPSILON_DECIMALS))
        secs = mean_interval([r.seconds for r in runs])
        cells.append("-" if secs is None else f"{secs.mean:.0f}")
        if spec.audit:
            for column in AUDIT_COLUMNS[1:]:
                values = [r.value(column) for r in runs]
                cells.append(interval_cell(values, decimals=EPSILON_DECIMALS))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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
