"""The human side of a run record: ``summary.md``, ``accuracy.png`` and ``privacy.png``.

Every answer about the run's protections comes from :func:`fedcore.protections.protections_of`
(never the raw ``dp.*`` settings), and every epsilon printed or plotted names the neighbouring
relation it holds for (:mod:`fedcore.privacy.relations`, :data:`fedcore.protections.RECORD_RELATION`).
:func:`close_record` closes a run: the record's own closing files (:meth:`RecordWriter.finish`) and
these; the record never imports this module.
"""

from __future__ import annotations

import datetime as dt
import math
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from fedcore.mechanisms import BudgetAgainst
from fedcore.privacy.relations import SiteRelation
from fedcore.protections import protections_of

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from fedcore.config import Settings
    from fedcore.mechanisms import Mechanism
    from fedcore.protections import Protections
    from fedcore.runrecord import RecordWriter, RoundRow, Status

SAMPLE_KNOWN = "server_epsilon_sample_known"
SAMPLE_KNOWN_REPLACE_ONE = "server_epsilon_sample_known_replace_one"


def close_record(record: RecordWriter, *, status: Status, reason: str = "") -> None:
    """Close a run: ``accuracy.png``, ``privacy.png`` (with DP on) and ``summary.md``, then the
    record's own closing files (:meth:`RecordWriter.finish`: ``status.json``, written last, so a
    program that sees it finds the rest). Safe to call after a failure."""
    write_accuracy_plot(record, record.path / "accuracy.png")
    write_privacy_plot(record, record.path / "privacy.png")
    write_summary(record, record.path / "summary.md", status=status, reason=reason)
    record.finish(status=status, reason=reason)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and not math.isfinite(value))
        else format(value, spec)
    )


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def privacy_mode(settings: Settings) -> str:
    """The privacy protections of a run and their key parameters, in one line (summary and plots)."""
    protections = protections_of(settings)
    parts = []
    sa = protections.secagg
    if sa is not None:
        threshold = "default" if sa.threshold is None else str(sa.threshold)
        neighbors = "complete" if sa.neighbors == 0 else str(sa.neighbors)
        parts.append(
            f"secure aggregation ({sa.mode_name}, neighbors {neighbors}, threshold {threshold}, "
            f"{sa.bits} bits)"
        )
    site = protections.record
    if site is not None:
        noise = "calibrated" if site.calibrated else f"{site.noise_multiplier:g}"
        parts.append(
            f"record-level DP-SGD (eps {site.epsilon:g}, delta {site.delta:g}, noise {noise}, "
            f"clip {site.max_grad_norm:g})"
        )
    server = protections.mechanism
    if server is not None and protections.distributed is not None:
        parts.append(server.describe())
    elif server is not None:
        noise = "calibrated" if server.calibrated else f"{server.noise_multiplier:g}"
        parts.append(
            f"site-level DP-FedAvg (eps {server.epsilon:g}, delta {server.delta:g}, noise {noise}, "
            f"{server.clip.value} clip {server.clip_norm:g}, sampling rate {server.sampling_rate:g})"
        )
    return "; ".join(parts) if parts else "no privacy protection (plain federated averaging)"


def _withheld(record: RecordWriter) -> tuple[str, ...]:
    """The history fields the run may not publish (:class:`fedcore.protections.Publication`)."""
    return protections_of(record.settings).publication.withheld_fields()


def has_privacy(record: RecordWriter) -> bool:
    return protections_of(record.settings).any_dp


def write_accuracy_plot(record: RecordWriter, path: Path) -> None:
    """Central accuracy and loss per round (round 0 = initial model), site-side accuracy dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [0] + [r.round for r in record.rows]
    accuracy = [record.initial_accuracy] + [r.eval_accuracy for r in record.rows]
    loss = [record.initial_loss] + [r.eval_loss for r in record.rows]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(rounds, accuracy, marker="o", label="central (held-out)")
    withheld = _withheld(record)
    if "site_eval_accuracy" not in withheld and any(
        math.isfinite(r.site_eval_accuracy) for r in record.rows
    ):
        ax_acc.plot(
            [r.round for r in record.rows],
            [r.site_eval_accuracy for r in record.rows],
            marker=".",
            linestyle="--",
            label="sites' test splits" + (" (outside DP)" if has_privacy(record) else ""),
        )
    ax_acc.set(
        xlabel="round", ylabel="accuracy", title="Accuracy of the global model", ylim=(0, 1.02)
    )
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="lower right")
    ax_loss.plot(rounds, loss, marker="o", color="tab:red", label="central eval loss")
    train = [r.train_loss for r in record.rows]
    if "train_loss" not in withheld and any(math.isfinite(v) for v in train):
        ax_loss.plot(
            [r.round for r in record.rows],
            train,
            marker=".",
            linestyle="--",
            color="tab:gray",
            label="train loss",
        )
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(loc="upper right")
    s = record.settings
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(
        f"{s.dataset}, {s.sites} sites ({s.partition}), {s.model}, {s.strategy}\n{privacy_mode(s)}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the privacy plot ---------------------------------------------------------------------------


def _label(what: str, relation: str) -> str:
    """A legend entry: what the line is, then the neighbouring relation it holds for."""
    return textwrap.fill(f"{what}; relation: {relation}", width=90)


def budget_relation(mechanism: Mechanism) -> str:
    """The relation of the epsilon a site-level budget binds (``dp.server.budget_against``)."""
    if mechanism.budget_against is BudgetAgainst.SAMPLE_KNOWN:
        return mechanism.sample_known_relation
    return mechanism.relation


def _plot_record_level(ax: Axes, record: RecordWriter, protections: Protections) -> list[float]:
    """Each site's record-level epsilon (unless withheld: which site reported in which round would
    reveal the sample under site-level DP) and the site budget. Returns the budget, for the axis."""
    relation = protections.record.relation if protections.record is not None else ""
    sites = (
        []
        if "site_epsilon" in _withheld(record)
        else sorted({site for r in record.rows for site in r.site_epsilon}, key=int)
    )
    for i, site in enumerate(sites):
        ax.plot(
            [r.round for r in record.rows if site in r.site_epsilon],
            [r.site_epsilon[site] for r in record.rows if site in r.site_epsilon],
            color="tab:blue",
            alpha=0.35,
            marker=".",
            label=_label("each site (record level)", relation) if i == 0 else None,
        )
    if protections.record is None:
        return []
    budget = protections.record.epsilon
    ax.axhline(
        budget, color="tab:blue", linestyle="--", label=_label(f"site budget {budget:g}", relation)
    )
    return [budget]


def _plot_site_level(ax: Axes, record: RecordWriter, mechanism: Mechanism) -> list[float]:
    """The federation's epsilons, one curve per observer and relation, and its budget. Returns
    the values the axis must show."""
    rounds = [r.round for r in record.rows]
    known = "site level, observers who know the sample"
    curves = (  # (what, relation, values, colour, marker)
        (
            "site level, observers who do not know the sample",
            mechanism.relation,
            [r.server_epsilon for r in record.rows],
            "tab:red",
            "o",
        ),
        (
            known,
            mechanism.sample_known_relation,
            [extra_epsilon(r, SAMPLE_KNOWN) for r in record.rows],
            "tab:purple",
            "s",
        ),
        (
            known,
            SiteRelation.REPLACE_ONE.value,
            [extra_epsilon(r, SAMPLE_KNOWN_REPLACE_ONE) for r in record.rows],
            "tab:pink",
            "^",
        ),
    )
    shown: list[float] = [mechanism.epsilon]
    for what, relation, values, color, marker in curves:
        finite = [v for v in values if math.isfinite(v)]
        if finite or relation == mechanism.relation:
            ax.plot(rounds, values, color=color, marker=marker, label=_label(what, relation))
            shown += finite
    binds = mechanism.budget_against.value
    ax.axhline(
        mechanism.epsilon,
        color="tab:red",
        linestyle="--",
        label=_label(
            f"federation budget {mechanism.epsilon:g} (binds {binds})", budget_relation(mechanism)
        ),
    )
    return shown


def privacy_figure(record: RecordWriter) -> Figure:
    """The privacy plot: epsilon spent per round, each curve and budget line labelled with the
    neighbouring relation it holds for. The figure is closed (drawn off pyplot's list)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    protections = protections_of(record.settings)
    fig, ax = plt.subplots(figsize=(8, 6.5))
    shown = _plot_record_level(ax, record, protections)
    if protections.mechanism is not None:
        shown += _plot_site_level(ax, record, protections.mechanism)
    ax.set(
        xlabel="round",
        ylabel="epsilon spent (at the budgeted delta)",
        title=f"Privacy spent per round ({protections.accountant} accountant)",
    )
    fig.suptitle(textwrap.fill(privacy_mode(record.settings), width=120), fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if record.rows:  # every round, released or not (a skipped one has no point)
        ax.set_xlim(record.rows[0].round - 0.5, record.rows[-1].round + 0.5)
    ax.set_ylim(bottom=0, top=1.15 * max(shown, default=1.0))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def write_privacy_plot(record: RecordWriter, path: Path) -> None:
    """``privacy.png`` (:func:`privacy_figure`); nothing when the run has no DP."""
    if has_privacy(record):
        privacy_figure(record).savefig(path, dpi=110, bbox_inches="tight")


def extra_epsilon(row: RoundRow, key: str) -> float:
    """A row's epsilon added by a privacy layer (NaN where the round released nothing)."""
    value = row.extra.get(key)
    return math.nan if value is None else float(value)


def sample_known(row: RoundRow) -> float:
    """A row's ``server_epsilon_sample_known`` (NaN where the round released nothing)."""
    return extra_epsilon(row, SAMPLE_KNOWN)


# -- the summary ----------------------------------------------------------------------------------


def _last_finite(values: Iterable[float]) -> float:
    """The last finite value (the epsilon spent so far), NaN if none."""
    finite = [v for v in values if math.isfinite(v)]
    return finite[-1] if finite else math.nan


def _record_level_line(record: RecordWriter, protections: Protections) -> list[str]:
    site = protections.record
    if site is None:
        return []
    if "site_epsilon" in _withheld(record):
        spend = "per-site spends are in `operator.jsonl` (they would reveal the sample)"
    else:
        spent = [e for r in record.rows for e in r.site_epsilon.values()]
        top = f"{max(spent):.3f}" if spent else "-"
        declined = sum(r.sites_declined for r in record.rows)
        spend = f"largest spend reported {top}; {declined} site-rounds declined"
    return [
        f"- **Record-level DP (DP-SGD)**: budget epsilon {site.epsilon:g} at delta "
        f"{site.delta:g} per site; {spend}. Each site's epsilon holds for the neighbouring "
        f"relation *{site.relation}*, against anyone who sees its updates or anything derived "
        "from them, the server included; the sites' evaluation on their own test splits "
        "(`site_eval_*`) is outside it.",
        _receipts_line(protections),
    ]


def _receipts_line(protections: Protections) -> str:
    """Where the federation's receipts of the sites' spends live (server.receipts)."""
    where = (
        f"in `{protections.state_dir}`, across runs"
        if protections.state_dir
        else "in this run record only: a new run starts without them (set `dp.server.state_dir` "
        "to keep them across runs)"
    )
    return (
        "  - The federation keeps a receipt of each site's reported spend (`receipts.json`, "
        f"{where}); a site whose ledger is behind its receipt (lost, or restored from a backup) "
        "is refused."
    )


def _spent_so_far(record: RecordWriter) -> str:
    """``server_epsilon`` at the end: the last finite one, saying so when the last round released
    nothing (a skipped round charges nothing, so what was spent before it still stands)."""
    rows = record.rows
    spent = _last_finite(r.server_epsilon for r in rows)
    if not math.isfinite(spent):
        return "- (no round released)"
    if math.isfinite(rows[-1].server_epsilon):
        return f"{spent:.3f}"
    return f"{spent:.3f} (spent so far: round {rows[-1].round} released nothing)"


def _site_level_lines(record: RecordWriter, mechanism: Mechanism) -> list[str]:
    if hasattr(mechanism, "summary_lines"):  # distributed DP: its own words
        return [*mechanism.summary_lines(_spent_so_far(record)), _ledger_line(mechanism)]
    known = _last_finite(sample_known(r) for r in record.rows)
    replace = _last_finite(extra_epsilon(r, SAMPLE_KNOWN_REPLACE_ONE) for r in record.rows)
    replace_text = (
        f"; under *{SiteRelation.REPLACE_ONE.value}* `{SAMPLE_KNOWN_REPLACE_ONE}` {replace:.3f}"
        if math.isfinite(replace)
        else ""
    )
    return [
        f"- **Site-level DP ({mechanism.title})**: budget epsilon {mechanism.epsilon:g} at delta "
        f"{mechanism.delta:g}, binding the `{mechanism.budget_against.value}` epsilon (relation "
        f"*{budget_relation(mechanism)}*).",
        f"  - `server_epsilon` {_spent_so_far(record)}, for the neighbouring relation "
        f"*{mechanism.relation}*, against anyone who sees the released models but not which "
        "sites took part (amplification by sampling).",
        f"  - `{SAMPLE_KNOWN}` {_fmt(known, '.3f')}, for the neighbouring relation "
        f"*{mechanism.sample_known_relation}*{replace_text}, against anyone who also knows "
        "which sites took part (the participants under secure aggregation, the operator), for a "
        "site that took part in every released round (no amplification).",
        "  - Neither holds against the server, which sees every update (under secure "
        "aggregation, the exact sum) before the noise.",
        _ledger_line(mechanism),
    ]


def _ledger_line(mechanism: Mechanism) -> str:
    """Whether the federation ledger outlives the run (``dp.server.state_dir``)."""
    if mechanism.persistent:
        return (
            f"  - The federation ledger is kept across runs in `{mechanism.state_dir}`: "
            "`server_epsilon` counts the rounds of earlier runs with that ledger too."
        )
    return (
        "  - The federation ledger is per run: it started at zero for this run, and a new run "
        "with the same sites starts at zero again (set `dp.server.state_dir` to keep it across "
        "runs)."
    )


def _privacy_lines(record: RecordWriter) -> list[str]:
    protections = protections_of(record.settings)
    if not protections.any_dp:
        return []
    lines = _record_level_line(record, protections)
    if protections.mechanism is not None:
        lines += _site_level_lines(record, protections.mechanism)
    withheld = protections.publication.withheld_fields()
    if withheld:
        lines.append(
            "- **Withheld**: the per-round diagnostics these guarantees do not cover ("
            + ", ".join(f"`{k}`" for k in withheld)
            + ") are in `operator.jsonl` (mode 0600, for the operator), not in this record's "
            "public files."
        )
    return [*lines, "", "![privacy](privacy.png)", ""]


def _traffic(record: RecordWriter) -> str:
    if "bytes_down" in _withheld(record):
        return "- **Traffic**: withheld under site-level DP (it counts the sampled sites)"
    rows = record.rows
    return (
        f"- **Traffic**: {_bytes(sum(r.bytes_down for r in rows))} down, "
        f"{_bytes(sum(r.bytes_up for r in rows))} up"
    )


# Round-table columns: (header, history field it shows or None, how to format a row).
_COLUMNS = (
    ("sampled", "sites_sampled", lambda r: str(r.sites_sampled)),
    ("replied", "sites_replied", lambda r: str(r.sites_replied)),
    ("failed", "sites_failed", lambda r: str(r.sites_failed)),
    ("train loss", "train_loss", lambda r: _fmt(r.train_loss)),
    ("eval loss", None, lambda r: _fmt(r.eval_loss)),
    ("eval acc", None, lambda r: _fmt(r.eval_accuracy)),
    ("site acc", "site_eval_accuracy", lambda r: _fmt(r.site_eval_accuracy)),
    ("seconds", None, lambda r: f"{r.seconds:.2f}"),
)


def _round_table(record: RecordWriter) -> list[str]:
    withheld = _withheld(record)
    columns = [c for c in _COLUMNS if c[1] not in withheld]
    headers = [
        f"{name} (outside DP)" if key == "site_eval_accuracy" and has_privacy(record) else name
        for name, key, _ in columns
    ]
    lines = [
        "| round | " + " | ".join(headers) + " |",
        "|---:|" + "---:|" * len(columns),
    ]
    for r in record.rows:
        lines.append(f"| {r.round} | " + " | ".join(f(r) for _, _, f in columns) + " |")
    return lines


def status_line(status: Status, reason: str, *, rounds: int) -> str:
    """``completed``, ``failed: why``, or ``interrupted after round R (why)``."""
    if status == "interrupted":
        return f"interrupted after round {rounds}" + (f" ({reason})" if reason else "")
    return f"{status}" + (f": {reason}" if reason else "")


def _failures(record: RecordWriter) -> list[str]:
    """The site failures, unless withheld (node ids and reasons would reveal the sample)."""
    if "failures" in _withheld(record):
        return []
    failures = [(r.round, node, why) for r in record.rows for node, why in r.failures.items()]
    if not failures:
        return []
    return ["", "## Site failures", ""] + [
        f"- round {rnd}, node {node}: {why}" for rnd, node, why in failures
    ]


def write_summary(record: RecordWriter, path: Path, *, status: Status, reason: str) -> None:
    s = record.settings
    rows = record.rows
    elapsed = (dt.datetime.now(dt.UTC) - record.started).total_seconds()
    operator = (
        ", `operator.jsonl` (withheld diagnostics, mode 0600: not for publication)."
        if _withheld(record)
        else "."
    )
    lines = [
        "# fedcore run",
        "",
        f"- **Status**: {status_line(status, reason, rounds=len(rows))}",
        f"- **Federation**: {s.sites} sites, dataset `{s.dataset}`, partition `{s.partition}`, "
        f"model `{s.model}`, strategy `{s.strategy}`, seed {s.seed}",
        f"- **Privacy**: {privacy_mode(s)}",
        f"- **Rounds**: {len(rows)} of {s.rounds}, in {elapsed:.1f} s",
        f"- **Central accuracy**: {_fmt(record.initial_accuracy)} initially, "
        f"**{_fmt(record.final_accuracy)}** at the end",
        _traffic(record),
        "",
        *_privacy_lines(record),
        "![accuracy](accuracy.png)",
        "",
        *_round_table(record),
        *_failures(record),
        "",
        "Files: `config.json` (settings), `history.jsonl` (one line per round), `model.pt` "
        "(final state_dict)" + operator,
        "",
    ]
    path.write_text("\n".join(lines))
