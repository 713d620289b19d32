"""Progress of a federation on the terminal: a rich progress bar and one line per round."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from fedcore.protections import Publication
from fedcore.runrecord import RoundRow
from fedcore.training import EvalResult


def _f(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.4f}"


class RichReporter:
    """Shows ``round k/R`` with the latest loss and accuracy; prints a line per round.

    The console is as public as the record (an experiment saves it as a point's log): a round line
    shows only what the run's :class:`~fedcore.protections.Publication` publishes. Under
    site-level DP that is no training loss and no count of sampled, replying or failed sites
    (functions of the secret sample); under record-level DP no training loss."""

    def __init__(
        self, console: Console | None = None, *, publication: Publication | None = None
    ) -> None:
        self.console = console or Console(stderr=True)
        self.withheld = frozenset(() if publication is None else publication.withheld_fields())
        self.progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.task: TaskID | None = None
        self._last_waiting = -math.inf

    WAITING_EVERY = 5.0  # seconds between "waiting for sites" lines

    def started(self, *, rounds: int, initial: EvalResult, done: int = 0) -> None:
        """``done``: rounds a resumed run already has (its bar starts there)."""
        if done:
            self.console.print(
                f"resuming after round {done}/{rounds} from the checkpoint (round 0 was loss "
                f"{_f(initial.loss)}, accuracy {_f(initial.accuracy)})"
            )
        else:
            self.console.print(
                f"initial model: loss {_f(initial.loss)}, accuracy {_f(initial.accuracy)} "
                "(loss = train/eval)"
            )
        self.progress.start()
        self.task = self.progress.add_task("rounds", total=rounds, completed=done, status="")

    def waiting(self, *, connected: int, expected: int) -> None:
        """A line every few seconds (``flwr run --stream`` shows lines, not the bar's status)."""
        status = f"waiting for sites: {connected}/{expected} connected"
        if self.task is not None:
            self.progress.update(self.task, status=status)
        now = time.monotonic()
        if now - self._last_waiting >= self.WAITING_EVERY:
            self._last_waiting = now
            self.progress.console.print(status, soft_wrap=True)

    def round_line(self, row: RoundRow, *, rounds: int) -> str:
        """The round's line, without what the run does not publish."""
        if "train_loss" in self.withheld:
            loss = f"eval loss {_f(row.eval_loss)}"
        else:
            loss = f"loss {_f(row.train_loss)}/{_f(row.eval_loss)}"
        sites = ""
        if "sites_sampled" not in self.withheld:
            failed = f", [red]{row.sites_failed} failed[/red]" if row.sites_failed else ""
            sites = f"  sites {row.sites_replied}/{row.sites_sampled}{failed}"
        return (
            f"round {row.round:>3}/{rounds}  {loss}  acc {_f(row.eval_accuracy)}{sites}  "
            f"{row.seconds:.1f}s"
        )

    def round_done(self, row: RoundRow, *, rounds: int) -> None:
        self.progress.console.print(self.round_line(row, rounds=rounds), soft_wrap=True)
        if self.task is not None:
            self.progress.update(self.task, advance=1, status=f"accuracy {_f(row.eval_accuracy)}")
        if row.round == rounds:
            self.close()

    def close(self) -> None:
        self.progress.stop()
