"""The console's progress: a resumed run says it resumed and its bar starts where the run was
(issue 25, point 6: it printed the round-0 model as the "initial model" and its bar ended at
10/20 on a completed run)."""

from __future__ import annotations

import io

from rich.console import Console

from fedcore.federation.server.progress import RichReporter
from fedcore.training import EvalResult


def _reporter() -> tuple[RichReporter, io.StringIO]:
    out = io.StringIO()
    return RichReporter(Console(file=out, width=120)), out


def test_a_resumed_run_says_so_and_its_bar_starts_at_the_rounds_done():
    reporter, out = _reporter()
    reporter.started(rounds=20, initial=EvalResult(loss=2.3, accuracy=0.1, num_examples=0), done=10)
    assert "resuming after round 10/20" in out.getvalue()
    assert "initial model" not in out.getvalue()
    assert reporter.progress.tasks[0].completed == 10
    reporter.close()


def test_a_fresh_run_shows_the_initial_model():
    reporter, out = _reporter()
    reporter.started(rounds=3, initial=EvalResult(loss=2.3, accuracy=0.1, num_examples=0))
    assert "initial model: loss 2.3000" in out.getvalue()
    assert reporter.progress.tasks[0].completed == 0
    reporter.close()
