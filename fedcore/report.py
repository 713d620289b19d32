"""The human side of a run record: ``summary.md`` and ``accuracy.png``."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedcore.config import Settings
    from fedcore.runrecord import RunRecord, Status


def _fmt(value: float, spec: str = ".4f") -> str:
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
    parts = []
    sa = settings.secagg
    if sa.enabled:
        threshold = "default" if sa.threshold is None else str(sa.threshold)
        parts.append(
            f"secure aggregation ({sa.mode}, neighbors {sa.neighbors}, threshold {threshold}, "
            f"{sa.bits} bits)"
        )
    site = settings.dp.site
    if site.epsilon is not None:
        noise = "calibrated" if site.noise_multiplier is None else f"{site.noise_multiplier:g}"
        parts.append(
            f"record-level DP-SGD (eps {site.epsilon:g}, delta {site.delta:g}, noise {noise}, "
            f"clip {site.max_grad_norm:g})"
        )
    server = settings.dp.server
    if server.epsilon is not None:
        noise = "calibrated" if server.noise_multiplier is None else f"{server.noise_multiplier:g}"
        parts.append(
            f"site-level DP-FedAvg (eps {server.epsilon:g}, delta {server.delta:g}, noise {noise}, "
            f"{server.clipping} clip {server.clip_norm:g}, sampling rate {settings.fraction_train:g})"
        )
    return "; ".join(parts) if parts else "no privacy protection (plain federated averaging)"


def write_accuracy_plot(record: RunRecord, path: Path) -> None:
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
    if any(math.isfinite(r.site_eval_accuracy) for r in record.rows):
        ax_acc.plot(
            [r.round for r in record.rows],
            [r.site_eval_accuracy for r in record.rows],
            marker=".",
            linestyle="--",
            label="sites' test splits",
        )
    ax_acc.set(
        xlabel="round", ylabel="accuracy", title="Accuracy of the global model", ylim=(0, 1.02)
    )
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="lower right")
    ax_loss.plot(rounds, loss, marker="o", color="tab:red", label="central eval loss")
    train = [r.train_loss for r in record.rows]
    if any(math.isfinite(v) for v in train):
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


def has_privacy(record: RunRecord) -> bool:
    dp = record.settings.dp
    return dp.site.epsilon is not None or dp.server.epsilon is not None


def write_privacy_plot(record: RunRecord, path: Path) -> None:
    """Epsilon spent per round: the federation's (DP-FedAvg) and each site's (DP-SGD), with budgets."""
    if not has_privacy(record):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    dp = record.settings.dp
    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = [r.round for r in record.rows]
    sites = sorted({site for r in record.rows for site in r.site_epsilon}, key=int)
    for i, site in enumerate(sites):
        ax.plot(
            [r.round for r in record.rows if site in r.site_epsilon],
            [r.site_epsilon[site] for r in record.rows if site in r.site_epsilon],
            color="tab:blue",
            alpha=0.35,
            marker=".",
            label="each site (record level)" if i == 0 else None,
        )
    if dp.site.epsilon is not None:
        ax.axhline(
            dp.site.epsilon,
            color="tab:blue",
            linestyle="--",
            label=f"site budget {dp.site.epsilon:g}",
        )
    if dp.server.epsilon is not None:
        ax.plot(
            rounds,
            [r.server_epsilon for r in record.rows],
            color="tab:red",
            marker="o",
            label="federation (site level)",
        )
        ax.axhline(
            dp.server.epsilon,
            color="tab:red",
            linestyle="--",
            label=f"federation budget {dp.server.epsilon:g}",
        )
    ax.set(
        xlabel="round",
        ylabel="epsilon spent",
        title=f"Privacy spent (delta as budgeted, {dp.accountant} accountant)",
    )
    fig.suptitle(privacy_mode(record.settings), fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    budgets = [b for b in (dp.site.epsilon, dp.server.epsilon) if b is not None]
    ax.set_ylim(bottom=0, top=1.15 * max(budgets))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _privacy_lines(record: RunRecord) -> list[str]:
    if not has_privacy(record):
        return []
    dp = record.settings.dp
    last = record.rows[-1] if record.rows else None
    lines = []
    if dp.site.epsilon is not None:
        spent = list(last.site_epsilon.values()) if last else []
        top = f"{max(spent):.3f}" if spent else "-"
        declined = sum(r.sites_declined for r in record.rows)
        lines.append(
            f"- **Record-level DP (DP-SGD)**: budget epsilon {dp.site.epsilon:g} at delta {dp.site.delta:g} per site; "
            f"largest spend reported in the last round {top}; {declined} site-rounds declined"
        )
    if dp.server.epsilon is not None:
        spent_server = _fmt(last.server_epsilon, ".3f") if last else "-"
        lines.append(
            f"- **Site-level DP (DP-FedAvg)**: budget epsilon {dp.server.epsilon:g} at delta {dp.server.delta:g}; "
            f"spent {spent_server}"
        )
    return [*lines, "", "![privacy](privacy.png)", ""]


def status_line(status: Status, reason: str, *, rounds: int) -> str:
    """``completed``, ``failed: why``, or ``interrupted after round R (why)``."""
    if status == "interrupted":
        return f"interrupted after round {rounds}" + (f" ({reason})" if reason else "")
    return f"{status}" + (f": {reason}" if reason else "")


def write_summary(record: RunRecord, path: Path, *, status: Status, reason: str) -> None:
    s = record.settings
    rows = record.rows
    elapsed = (dt.datetime.now(dt.UTC) - record.started).total_seconds()
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
        f"- **Traffic**: {_bytes(sum(r.bytes_down for r in rows))} down, "
        f"{_bytes(sum(r.bytes_up for r in rows))} up",
        "",
        *_privacy_lines(record),
        "![accuracy](accuracy.png)",
        "",
        "| round | sampled | replied | failed | train loss | eval loss | eval acc | site acc | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.round} | {r.sites_sampled} | {r.sites_replied} | {r.sites_failed} | {_fmt(r.train_loss)} "
            f"| {_fmt(r.eval_loss)} | {_fmt(r.eval_accuracy)} | {_fmt(r.site_eval_accuracy)} | {r.seconds:.2f} |"
        )
    failures = [(r.round, node, why) for r in rows for node, why in r.failures.items()]
    if failures:
        lines += ["", "## Site failures", ""]
        lines += [f"- round {rnd}, node {node}: {why}" for rnd, node, why in failures]
    lines += [
        "",
        "Files: `config.json` (settings), `history.jsonl` (one line per round), `model.pt` (final state_dict).",
        "",
    ]
    path.write_text("\n".join(lines))
