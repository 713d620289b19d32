"""An experiment's plots, from its results (matplotlib, no display), sized for a paper's column.

- ``accuracy_vs_epsilon.png``: final central accuracy against the epsilon budget, one line per
  mode (and per value of any other swept setting), error bars the 95 % interval over seeds; the
  mode without DP is a horizontal dashed line (its interval shaded with three seeds or more).
  Delta is in the title.
- ``epsilon_per_round.png``: the epsilon spent after each round, mean over seeds, one line per
  private point (solid: the epsilon the mode's budget binds; dashed, drawn over it: the
  site-level epsilon against observers who know the sample, where the run record gives it; the
  legend says where the two coincide, as they do when every site takes part in every round).
- ``accuracy_per_round.png``: central accuracy after each round, mean over seeds (its 95 %
  interval shaded with three seeds or more), one line per point: the modes side by side as they
  train.
- ``<setting>_vs_accuracy.png``: for every other swept setting, final accuracy against it; a
  point that ignores the setting (a central baseline beside a ``dp.distributed.*`` axis) is a
  horizontal dashed line.
- ``audit.png`` (with ``audit = true``): the empirical lower bound and the control's against
  the formal epsilon, with the dashed line where they would be equal.

Every legend stands outside the axes, to their right, so that it covers no point; the figure is
saved with its bounding box around both.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedcore.experiment.plan import SEED_AXIS, display
from fedcore.experiment.results import RoundEpsilon, RunResult, groups, mean_interval
from fedcore.experiment.spec import EPSILON_AXIS, MODE_AXIS, ExperimentSpec

SIZE = (7, 4.2)
DPI = 150
Series = list[tuple[float, float, float]]  # (x, mean, half-width)
# With two seeds the Student-t half-width is 12.7 standard errors: a band over the whole axis.
MIN_SEEDS_FOR_BAND = 3


def _pyplot():  # noqa: ANN202 - the pyplot module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(key: Sequence[tuple[str, str]], skip: Sequence[str]) -> str:
    parts = []
    for k, v in key:
        if k in skip or not v:
            continue
        parts.append(v if k == MODE_AXIS else f"{'ε' if k == EPSILON_AXIS else k}={v}")
    return ", ".join(parts) or "runs"


def delta_text(results: Sequence[RunResult]) -> str:
    """``δ = 1e-05`` (or every delta the private points ran at); empty without DP."""
    deltas = sorted({r.mechanism.delta for r in results if r.mechanism.delta is not None})
    return f"δ = {', '.join(f'{d:g}' for d in deltas)}" if deltas else ""


def _titled(text: str, results: Sequence[RunResult]) -> str:
    delta = delta_text(results)
    return f"{text} ({delta})" if delta else text


def _legend_outside(ax: Any) -> None:  # noqa: ANN401 - a matplotlib Axes
    if ax.get_legend_handles_labels()[0]:
        ax.legend(
            loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=8, frameon=False
        )


def _save(fig: Any, path: Path) -> None:  # noqa: ANN401 - a matplotlib Figure
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)


def write_plots(results: Sequence[RunResult], spec: ExperimentSpec, out: Path) -> list[str]:
    """Write every plot that the spec's axes and the runs call for; returns their file names."""
    figures: list[tuple[str, Any]] = []
    axes = [name for name, _ in spec.axes]
    if EPSILON_AXIS in axes:
        figures.append(("accuracy_vs_epsilon.png", accuracy_vs_epsilon_figure(results)))
    if any(r.per_round and _bound_epsilon(r, r.per_round[-1]) is not None for r in results):
        figures.append(("epsilon_per_round.png", epsilon_per_round_figure(results)))
    if any(a is not None for r in results for a in r.accuracy_per_round):
        figures.append(("accuracy_per_round.png", accuracy_per_round_figure(results)))
    if spec.audit and any(r.audit_epsilon_lower_bound is not None for r in results):
        figures.append(("audit.png", audit_figure(results)))
    for axis in axes:
        if axis not in (MODE_AXIS, EPSILON_AXIS, SEED_AXIS):
            name = re.sub(r"[^A-Za-z0-9.-]+", "_", axis) + "_vs_accuracy.png"
            figures.append((name, setting_vs_accuracy_figure(results, axis)))
    for name, fig in figures:
        _save(fig, out / name)
    return [name for name, _ in figures]


def _errorbars(ax: Any, lines: dict[str, Series]) -> None:  # noqa: ANN401 - a matplotlib Axes
    for label, pts in lines.items():
        pts.sort()
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[p[2] for p in pts],
            marker="o",
            capsize=3,
            label=label,
        )


def accuracy_vs_epsilon_figure(results: Sequence[RunResult]) -> Any:  # noqa: ANN401 - a Figure
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    lines: dict[str, Series] = {}
    for key, runs in groups(results).items():
        interval = mean_interval([r.final_accuracy for r in runs])
        if interval is None:
            continue
        err = interval.half_width or 0.0
        eps = dict(key).get(EPSILON_AXIS)
        label = _label(key, skip=(EPSILON_AXIS,))
        if not eps:  # no DP: a reference line
            line = ax.axhline(interval.mean, linestyle="--", color="gray", label=f"{label} (no DP)")
            if interval.n >= MIN_SEEDS_FOR_BAND:
                low, high = interval.mean - err, interval.mean + err
                ax.axhspan(low, high, color=line.get_color(), alpha=0.15)
            continue
        lines.setdefault(label, []).append((float(eps), interval.mean, err))
    _errorbars(ax, lines)
    ticks = sorted({p[0] for pts in lines.values() for p in pts})
    if ticks:
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("ε budget (the mode's own)")
    ax.set_ylabel("final central accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(_titled("Accuracy against ε (mean, 95% interval over seeds)", results))
    ax.grid(True, alpha=0.3)
    _legend_outside(ax)
    return fig


def _bound_epsilon(run: RunResult, row: RoundEpsilon) -> float | None:
    return row.record_epsilon if run.level == "record" else row.server_epsilon


def _mean_by_round(columns: Sequence[Sequence[float | None]]) -> list[float]:
    """The mean over runs of each round's value (NaN where no run has one)."""
    rounds = max((len(c) for c in columns), default=0)
    means = []
    for i in range(rounds):
        present = [c[i] for c in columns if len(c) > i and c[i] is not None]
        means.append(statistics.fmean(present) if present else math.nan)
    return means


def epsilon_per_round_figure(results: Sequence[RunResult]) -> Any:  # noqa: ANN401 - a Figure
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=SIZE)
    for key, runs in groups(results).items():
        bound = _mean_by_round([[_bound_epsilon(r, row) for row in r.per_round] for r in runs])
        known = _mean_by_round(
            [[row.server_epsilon_sample_known for row in r.per_round] for r in runs]
        )
        if all(math.isnan(v) for v in bound):  # no DP
            continue
        label = _label(key, skip=())
        x = list(range(1, len(bound) + 1))
        (line,) = ax.plot(x, bound, marker=".", linewidth=1.2, label=label, zorder=2)
        if any(not math.isnan(v) for v in known):
            same = all(
                math.isnan(k) or math.isclose(k, b, rel_tol=1e-6)
                for k, b in zip(known, bound, strict=True)
            )
            note = " (the same: every site takes part)" if same else ""
            ax.plot(
                x,
                known,
                linestyle=(0, (4, 3)),
                linewidth=2.6,
                color=line.get_color(),
                label=f"{label}: sample known{note}",
                zorder=3,  # over the solid line, so that it shows where the two coincide
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent")
    ax.set_title(_titled("ε spent per round (dashed: site-level, sample known)", results))
    ax.grid(True, alpha=0.3)
    _legend_outside(ax)
    return fig


def accuracy_per_round_figure(results: Sequence[RunResult]) -> Any:  # noqa: ANN401 - a Figure
    """Central accuracy after each round, mean over seeds; its 95 % interval shaded where every
    round has :data:`MIN_SEEDS_FOR_BAND` seeds or more."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=SIZE)
    for key, runs in groups(results).items():
        columns = [r.accuracy_per_round for r in runs]
        rounds = max((len(c) for c in columns), default=0)
        intervals = [mean_interval([c[i] for c in columns if len(c) > i]) for i in range(rounds)]
        points = [(i + 1, iv) for i, iv in enumerate(intervals) if iv is not None]
        if not points:
            continue
        x = [p[0] for p in points]
        mean = [p[1].mean for p in points]
        (line,) = ax.plot(x, mean, marker=".", label=_label(key, skip=()))
        if all(p[1].n >= MIN_SEEDS_FOR_BAND for p in points):
            half = [p[1].half_width or 0.0 for p in points]
            low = [m - h for m, h in zip(mean, half, strict=True)]
            high = [m + h for m, h in zip(mean, half, strict=True)]
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("central accuracy")
    ax.set_ylim(0, 1.02)
    title = (
        f"Accuracy per round (mean over seeds; shaded: 95% interval, {MIN_SEEDS_FOR_BAND}+ seeds)"
    )
    ax.set_title(_titled(title, results))
    ax.grid(True, alpha=0.3)
    _legend_outside(ax)
    return fig


def setting_vs_accuracy_figure(results: Sequence[RunResult], axis: str) -> Any:  # noqa: ANN401
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    values: list[str] = []
    for r in results:
        v = display(r.point.swept.get(axis))
        if v and v not in values:  # empty: a point that ignores the axis (a reference line)
            values.append(v)
    numeric = all(_is_number(v) for v in values)
    position = {v: (float(v) if numeric else i) for i, v in enumerate(values)}
    lines: dict[str, Series] = {}
    for key, runs in groups(results).items():
        interval = mean_interval([r.final_accuracy for r in runs])
        if interval is None:
            continue
        if not dict(key)[axis]:
            label = f"{_label(key, skip=(axis,))} (takes no {axis})"
            ax.axhline(interval.mean, linestyle="--", color="gray", label=label)
            continue
        point = (position[dict(key)[axis]], interval.mean, interval.half_width or 0.0)
        lines.setdefault(_label(key, skip=(axis,)), []).append(point)
    _errorbars(ax, lines)
    if not numeric:
        ax.set_xticks(list(position.values()), list(position))
    ax.set_xlabel(axis)
    ax.set_ylabel("final central accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(_titled(f"Accuracy against {axis}", results))
    ax.grid(True, alpha=0.3)
    _legend_outside(ax)
    return fig


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


AUDIT_SERIES = (
    ("audit (noise on)", "audit_epsilon_lower_bound"),
    ("control (noise off)", "audit_control_epsilon_lower_bound"),
)


def audit_figure(results: Sequence[RunResult]) -> Any:  # noqa: ANN401 - a Figure
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    series: dict[str, Series] = {name: [] for name, _ in AUDIT_SERIES}
    for _key, runs in groups(results).items():
        formal = mean_interval([r.audit_epsilon_formal for r in runs])
        if formal is None:
            continue
        for name, column in AUDIT_SERIES:
            bound = mean_interval([r.value(column) for r in runs])
            if bound is not None:
                series[name].append((formal.mean, bound.mean, bound.half_width or 0.0))
    top = max([1.0, *(v for pts in series.values() for p in pts for v in p[:2])])
    _errorbars(ax, {name: pts for name, pts in series.items() if pts})
    ax.plot([0, top], [0, top], color="gray", linestyle="--", label="lower bound = formal")
    ax.set_xlabel("formal ε (record-level)")
    ax.set_ylabel("empirical lower bound (95% confidence)")
    ax.set_title(_titled("One-run audit of record-level DP-SGD", results))
    ax.grid(True, alpha=0.3)
    _legend_outside(ax)
    return fig
