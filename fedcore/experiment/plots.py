"""An experiment's plots, from its results (matplotlib, no display).

- ``accuracy_vs_epsilon.png``: final central accuracy against the epsilon budget, one line per
  mode (and per value of any other swept setting), error bars the 95 % interval over seeds; the
  mode without DP is a horizontal line with its interval shaded.
- ``epsilon_per_round.png``: the epsilon spent after each round, mean over seeds, one line per
  private point (solid: the epsilon the mode's budget binds; dashed: the site-level epsilon
  against observers who know the sample, where the run record gives it).
- ``<setting>_vs_accuracy.png``: for every other swept setting, final accuracy against it.
- ``audit.png`` (with ``audit = true``): the empirical lower bound and the control's against
  the formal epsilon, with the line where they would be equal.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from pathlib import Path

from fedcore.experiment.plan import SEED_AXIS, display
from fedcore.experiment.results import RunResult, groups, mean_interval
from fedcore.experiment.spec import EPSILON_AXIS, MODE_AXIS, ExperimentSpec, Mode


def _pyplot():  # noqa: ANN202 - the pyplot module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(key: Sequence[tuple[str, str]], skip: Sequence[str]) -> str:
    return ", ".join(f"{k}={v}" if k != MODE_AXIS else v for k, v in key if k not in skip and v) or "runs"


def write_plots(results: Sequence[RunResult], spec: ExperimentSpec, out: Path) -> list[str]:
    """Write every plot that the spec's axes call for; returns their file names."""
    written: list[str] = []
    axes = [name for name, _ in spec.axes]
    if EPSILON_AXIS in axes:
        _accuracy_vs_epsilon(results, out / "accuracy_vs_epsilon.png")
        written.append("accuracy_vs_epsilon.png")
    if any(r.per_round and _bound_epsilon(r, r.per_round[-1]) is not None for r in results):
        _epsilon_per_round(results, out / "epsilon_per_round.png")
        written.append("epsilon_per_round.png")
    if spec.audit and any(r.audit_epsilon_lower_bound is not None for r in results):
        _audit_plot(results, out / "audit.png")
        written.append("audit.png")
    for axis in axes:
        if axis in (MODE_AXIS, EPSILON_AXIS, SEED_AXIS):
            continue
        name = re.sub(r"[^A-Za-z0-9.-]+", "_", axis) + "_vs_accuracy.png"
        _setting_vs_accuracy(results, axis, out / name)
        written.append(name)
    return written


def _accuracy_vs_epsilon(results: Sequence[RunResult], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for key, runs in groups(results).items():
        interval = mean_interval([r.final_accuracy for r in runs])
        if interval is None:
            continue
        err = interval.half_width or 0.0
        eps = dict(key).get(EPSILON_AXIS)
        label = _label(key, skip=(EPSILON_AXIS,))
        if not eps:  # no DP: a reference line
            line = ax.axhline(interval.mean, linestyle="--", color="gray", label=f"{label} (no DP)")
            ax.axhspan(interval.mean - err, interval.mean + err, color=line.get_color(), alpha=0.15)
            continue
        lines.setdefault(label, []).append((float(eps), interval.mean, err))
    for label, pts in lines.items():
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker="o", capsize=3, label=label)
    ticks = sorted({p[0] for pts in lines.values() for p in pts})
    if ticks:
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("epsilon budget (the mode's own)")
    ax.set_ylabel("final central accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("Accuracy against epsilon (mean, 95% interval over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bound_epsilon(run: RunResult, row) -> float | None:  # noqa: ANN001 - a RoundEpsilon
    mode = run.point.swept.get(MODE_AXIS)
    if mode is Mode.RECORD or (mode is None and row.record_epsilon is not None):
        return row.record_epsilon
    return row.server_epsilon


def _epsilon_per_round(results: Sequence[RunResult], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, runs in groups(results).items():
        rounds = max((len(r.per_round) for r in runs), default=0)
        bound, known = [], []
        for i in range(rounds):
            rows = [(r, r.per_round[i]) for r in runs if len(r.per_round) > i]
            b = [v for v in (_bound_epsilon(r, row) for r, row in rows) if v is not None]
            k = [row.server_epsilon_sample_known for _, row in rows if row.server_epsilon_sample_known is not None]
            bound.append(statistics.fmean(b) if b else float("nan"))
            known.append(statistics.fmean(k) if k else float("nan"))
        if not any(v == v for v in bound):  # all NaN: no DP
            continue
        x = list(range(1, rounds + 1))
        (line,) = ax.plot(x, bound, marker=".", label=_label(key, skip=()))
        if any(v == v for v in known):
            ax.plot(x, known, linestyle="--", color=line.get_color())
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent")
    ax.set_title("Epsilon spent per round (dashed: site-level, sample known)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _setting_vs_accuracy(results: Sequence[RunResult], axis: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = []
    for r in results:
        v = display(r.point.swept.get(axis))
        if v not in values:
            values.append(v)
    numeric = all(_is_number(v) for v in values)
    position = {v: (float(v) if numeric else i) for i, v in enumerate(values)}
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for key, runs in groups(results).items():
        interval = mean_interval([r.final_accuracy for r in runs])
        if interval is None:
            continue
        label = _label(key, skip=(axis,))
        lines.setdefault(label, []).append((position[dict(key)[axis]], interval.mean, interval.half_width or 0.0))
    for label, pts in lines.items():
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker="o", capsize=3, label=label)
    if not numeric:
        ax.set_xticks(list(position.values()), list(position))
    ax.set_xlabel(axis)
    ax.set_ylabel("final central accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Accuracy against {axis}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _audit_plot(results: Sequence[RunResult], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    series: dict[str, list[tuple[float, float, float]]] = {"audit (noise on)": [], "control (noise off)": []}
    for _key, runs in groups(results).items():
        formal = mean_interval([r.audit_epsilon_formal for r in runs])
        if formal is None:
            continue
        for name, column in (("audit (noise on)", "audit_epsilon_lower_bound"),
                             ("control (noise off)", "audit_control_epsilon_lower_bound")):
            bound = mean_interval([r.value(column) for r in runs])
            if bound is not None:
                series[name].append((formal.mean, bound.mean, bound.half_width or 0.0))
    top = 1.0
    for name, pts in series.items():
        pts.sort()
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                        marker="o", capsize=3, label=name)
            top = max(top, *(p[0] for p in pts), *(p[1] for p in pts))
    ax.plot([0, top], [0, top], color="gray", linestyle="--", label="lower bound = formal")
    ax.set_xlabel("formal epsilon (record-level)")
    ax.set_ylabel("empirical lower bound (95% confidence)")
    ax.set_title("One-run audit of record-level DP-SGD")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
