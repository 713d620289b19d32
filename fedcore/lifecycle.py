"""How a run ends: its exit status, and the rules that close a run record nobody closed.

One home for the end-of-life rules of a run that ``fedcore simulate`` and ``fedcore deploy-local``
share (both start a federation in other processes and wait for it):

- the exit statuses: 0 completed (or stopped because a privacy budget is spent), 1 failed, 2
  refused before starting, ``128 + N`` stopped by signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP),
  as a shell reports a process killed by it; :func:`stopped_by_signal` tells such an ending (also
  a negative status, Python's way of saying "killed by that signal") from a result;
- :func:`close_crashed`: the server died without closing the record; it is closed as failed as of
  its last checkpoint, or removed if no round ran (:data:`STARTING_FILES`);
- :func:`interrupted`: a signal stopped the run; the record is closed as of the last completed
  round (``--resume`` continues it), or removed if no round ran;
- :func:`run_status` and :func:`report`: how the record says the run ended, printed, as an exit
  status.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedcore.config import Settings

EXIT_COMPLETED, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2
# A signal ends fedcore with 128 + its number, as a shell reports a process killed by it.
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
_SIGNAL_BASE = 128

# The files a run record starts with: a record holding nothing else saw no round.
STARTING_FILES = frozenset(
    {
        "config.json",
        "history.jsonl",
        "summary.md",
        "accuracy.png",
        "status.json",
        ".writer.lock",
    }
)


def signal_exit(signum: int) -> int:
    """The exit status of a run stopped by ``signum``: ``128 + signum``."""
    return EXIT_SIGNAL.get(signal.Signals(signum), _SIGNAL_BASE + signum)


def stopped_by_signal(returncode: int) -> bool:
    """Whether a process's exit status says a signal stopped it rather than that it ran to an
    end: negative (killed by that signal, as :mod:`subprocess` reports it) or ``128 + N`` for a
    signal N (fedcore's own status after a SIGINT, SIGTERM or SIGHUP, or a shell's for a kill)."""
    return returncode < 0 or _SIGNAL_BASE < returncode <= _SIGNAL_BASE + int(signal.SIGRTMAX)


def remove_if_nothing_ran(out_dir: Path, *, resumed: bool) -> None:
    """Remove a record that holds only the files a run starts with: nothing ran, so no partial
    record is kept. Never a site's key or ledger (none exists before round 1, and round 1 comes
    after the first checkpoint), never a resumed record."""
    if not resumed and out_dir.is_dir() and {p.name for p in out_dir.iterdir()} <= STARTING_FILES:
        shutil.rmtree(out_dir, ignore_errors=True)


def close_crashed(out_dir: Path, *, returncode: int, resumed: bool) -> None:
    """The server process ended without closing the record: close it as failed as of its last
    checkpoint, or remove it if no round ran."""
    from fedcore.federation.server.serve import close_interrupted

    reason = f"the simulation process exited with status {returncode} (see the output above)"
    if close_interrupted(out_dir, reason=reason, status="failed") is None:
        remove_if_nothing_ran(out_dir, resumed=resumed)


def interrupted(
    out_dir: Path, signum: int, *, resumed: bool, resume_with: str = "fedcore simulate"
) -> int:
    """Close the record of a run stopped by ``signum``; the exit status for it. ``resume_with``:
    the command that continues it (``--resume DIR`` is added)."""
    from fedcore.federation.server.serve import close_interrupted

    name = signal.Signals(signum).name
    rounds = close_interrupted(out_dir, reason=f"received {name}")
    if rounds is None:
        remove_if_nothing_ran(out_dir, resumed=resumed)
        print(
            f"fedcore: {name}: stopped before the first round; no run record kept", file=sys.stderr
        )
    else:
        print(
            f"fedcore: {name}: stopped; every process it started is stopped; the record is closed "
            f"after round {rounds}: {out_dir} (continue with `{resume_with} --resume {out_dir}`)",
            file=sys.stderr,
        )
    return signal_exit(signum)


def run_status(out_dir: Path) -> dict[str, Any] | None:
    """``status.json`` of the record (None if the run wrote none)."""
    try:
        doc = json.loads((out_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _rounds_of(out_dir: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in (out_dir / "history.jsonl").read_text().splitlines()
        if line.strip()
    ]


def rounds_text(n: int) -> str:
    """``1 round``, ``2 rounds``."""
    return f"{n} round" if n == 1 else f"{n} rounds"


def report(out_dir: Path, settings: Settings, *, returncode: int = 0) -> int:
    """Print how the run ended from its record; 0 completed (or budget spent), 1 failed, 143
    interrupted (its server was stopped from outside)."""
    status = run_status(out_dir)
    if status is None:
        print(
            f"fedcore: the run failed before its first round (exit status {returncode}); "
            "no run record kept",
            file=sys.stderr,
        )
        return EXIT_FAILED
    rows = _rounds_of(out_dir)
    done = f"{len(rows)} of {rounds_text(settings.rounds)}"
    if status["status"] == "failed":
        print(
            f"fedcore: the run failed after {done}: {status['reason']}; see {out_dir / 'summary.md'}"
        )
        return EXIT_FAILED
    if status["status"] == "interrupted":  # its server was stopped (`flwr stop` in a deployment)
        print(
            f"fedcore: the run was interrupted after {done}: "
            f"{status['reason']}; continue it with --resume {out_dir}"
        )
        return EXIT_SIGNAL[signal.SIGTERM]
    if status["status"] == "stopped":
        print(f"fedcore: the run stopped after {done}: {status['reason']}")
    accuracy = rows[-1]["eval_accuracy"] if rows else None
    shown = "n/a" if accuracy is None or not math.isfinite(accuracy) else f"{accuracy:.4f}"
    print(f"final accuracy {shown} on the held-out set after {rounds_text(len(rows))}")
    print(f"run record: {out_dir}")
    return EXIT_COMPLETED
