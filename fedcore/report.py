"""The human side of a run record: ``summary.md`` and ``accuracy.png``."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import TYPE_CHECKING

from fedcore.runrecord import withheld_fields

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
    withheld = withheld_fields(record.settings)
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
    # Which site reported in which round would reveal the sample under site-level DP.
    withheld = withheld_fields(record.settings)
    sites = (
        []
        if "site_epsilon" in withheld
        else sorted({site for r in record.rows for site in r.site_epsilon}, key=int)
    )
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
            label="site level, observers who do not know the sample",
        )
        ax.plot(
            rounds,
            [sample_known(r) for r in record.rows],
            color="tab:purple",
            marker="s",
            label="site level, observers who know the sample",
        )
        ax.axhline(
            dp.server.epsilon,
            color="tab:red",
            linestyle="--",
            label=f"federation budget {dp.server.epsilon:g} (binds {dp.server.budget_against})",
        )
    ax.set(
        xlabel="round",
        ylabel="epsilon spent",
        title=f"Privacy spent (delta as budgeted, {dp.accountant} accountant)",
    )
    fig.suptitle(privacy_mode(record.settings), fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    budgets = [b for b in (dp.site.epsilon, dp.server.epsilon) if b is not None]
    known = [sample_known(r) for r in record.rows] if dp.server.epsilon is not None else []
    top = max([*budgets, *(k for k in known if math.isfinite(k))])
    ax.set_ylim(bottom=0, top=1.15 * top)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_known(row) -> float:  # noqa: ANN001 - a RoundRow
    """A row's ``server_epsilon_sample_known`` (NaN where the round released nothing)."""
    value = row.extra.get("server_epsilon_sample_known")
    return math.nan if value is None else float(value)


def _privacy_lines(record: RunRecord) -> list[str]:
    if not has_privacy(record):
        return []
    dp = record.settings.dp
    last = record.rows[-1] if record.rows else None
    withheld = withheld_fields(record.settings)
    lines = []
    if dp.site.epsilon is not None:
        if "site_epsilon" in withheld:
            spend = "per-site spends are in `operator.jsonl` (they would reveal the sample)"
        else:
            spent = [e for r in record.rows for e in r.site_epsilon.values()]
            top = f"{max(spent):.3f}" if spent else "-"
            declined = sum(r.sites_declined for r in record.rows)
            spend = f"largest spend reported {top}; {declined} site-rounds declined"
        lines.append(
            f"- **Record-level DP (DP-SGD)**: budget epsilon {dp.site.epsilon:g} at delta "
            f"{dp.site.delta:g} per site; {spend}. Each site's epsilon covers one training record "
            "of that site (add or remove one record; the site sends weight 1, not its example "
            "count) against anyone who sees its updates or anything derived from them, the server "
            "included; the sites' evaluation on their own test splits (`site_eval_*`) is outside it."
        )
    if dp.server.epsilon is not None:
        known = [sample_known(r) for r in record.rows if math.isfinite(sample_known(r))]
        lines.append(
            f"- **Site-level DP (DP-FedAvg)**: budget epsilon {dp.server.epsilon:g} at delta "
            f"{dp.server.delta:g}, binding the `{dp.server.budget_against}` epsilon. "
            f"`server_epsilon` {_fmt(last.server_epsilon if last else math.nan, '.3f')} covers one "
            "whole site (add or remove a site) against anyone who sees the released models but "
            "not which sites took part (amplification by sampling). "
            f"`server_epsilon_sample_known` {_fmt(known[-1] if known else math.nan, '.3f')} covers "
            "one whole site against anyone who also knows which sites took part (the participants "
            "under secure aggregation, the operator), over the rounds the most-sampled site took "
            "part in. Neither holds against the server, which sees every update (under secure "
            "aggregation, the exact sum) before the noise."
        )
    if withheld:
        lines.append(
            "- **Withheld**: the per-round diagnostics these guarantees do not cover ("
            + ", ".join(f"`{k}`" for k in withheld)
            + ") are in `operator.jsonl` (mode 0600, for the operator), not in this record's "
            "public files."
        )
    return [*lines, "", "![privacy](privacy.png)", ""]


def _traffic(record: RunRecord) -> str:
    if "bytes_down" in withheld_fields(record.settings):
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


def _round_table(record: RunRecord) -> list[str]:
    withheld = withheld_fields(record.settings)
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
        _traffic(record),
        "",
        *_privacy_lines(record),
        "![accuracy](accuracy.png)",
        "",
        *_round_table(record),
    ]
    failures = [(r.round, node, why) for r in rows for node, why in r.failures.items()]
    if "failures" in withheld_fields(s):
        failures = []  # node ids and reasons would reveal the sample: operator.jsonl only
    if failures:
        lines += ["", "## Site failures", ""]
        lines += [f"- round {rnd}, node {node}: {why}" for rnd, node, why in failures]
    lines += [
        "",
        "Files: `config.json` (settings), `history.jsonl` (one line per round), `model.pt` (final state_dict)"
        + (", `operator.jsonl` (withheld diagnostics, mode 0600: not for publication)." if withheld_fields(s) else "."),
        "",
    ]
    path.write_text("\n".join(lines))
