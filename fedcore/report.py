"""The human side of a run record: ``summary.md`` and ``accuracy.png``."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedcore.runrecord import RunRecord, Status


def _fmt(value: float, spec: str = ".4f") -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


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
    ax_acc.set(xlabel="round", ylabel="accuracy", title="Accuracy of the global model", ylim=(0, 1.02))
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="lower right")
    ax_loss.plot(rounds, loss, marker="o", color="tab:red", label="central eval loss")
    train = [r.train_loss for r in record.rows]
    if any(math.isfinite(v) for v in train):
        ax_loss.plot([r.round for r in record.rows], train, marker=".", linestyle="--", color="tab:gray", label="train loss")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(loc="upper right")
    s = record.settings
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{s.dataset}, {s.sites} sites ({s.partition}), {s.model}, {s.strategy}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(record: RunRecord, path: Path, *, status: Status, reason: str) -> None:
    s = record.settings
    rows = record.rows
    elapsed = (dt.datetime.now(dt.timezone.utc) - record.started).total_seconds()
    lines = [
        "# fedcore run",
        "",
        f"- **Status**: {status}" + (f": {reason}" if reason else ""),
        f"- **Federation**: {s.sites} sites, dataset `{s.dataset}`, partition `{s.partition}`, "
        f"model `{s.model}`, strategy `{s.strategy}`, seed {s.seed}",
        f"- **Rounds**: {len(rows)} of {s.rounds}, in {elapsed:.1f} s",
        f"- **Central accuracy**: {_fmt(record.initial_accuracy)} initially, "
        f"**{_fmt(record.final_accuracy)}** at the end",
        f"- **Traffic**: {_bytes(sum(r.bytes_down for r in rows))} down, "
        f"{_bytes(sum(r.bytes_up for r in rows))} up",
        "",
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
    lines += ["", "Files: `config.json` (settings), `history.jsonl` (one line per round), `model.pt` (final state_dict).", ""]
    path.write_text("\n".join(lines))
