"""The run report reads the run's protections, names every epsilon's relation, and is not imported
by the record (issues 19 and 20, point 6). Each test attacks what the report did before: it read
``settings.dp.*`` directly, printed ``server_epsilon -`` after a skipped last round, named no
zero-out or replace-one relation, said nothing of a per-run federation ledger, and the record
imported the report to finish."""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedcore.config import resolve
from fedcore.privacy.relations import SiteRelation
from fedcore.protections import RECORD_RELATION
from fedcore.report import close_record, privacy_figure, write_summary
from fedcore.runrecord import STATUS_FILE, RecordWriter, RoundRow

ROOT = Path(__file__).resolve().parents[1]
SITE_LEVEL = [
    "sites=4",
    "fraction_train=0.5",
    "dp.server.epsilon=40",
    "dp.server.noise_multiplier=1",
]
RECORD_LEVEL = ["dp.site.epsilon=8", "dp.site.noise_multiplier=1.1"]


def _row(rnd: int, server: float, *, known: float | None = None, **extra) -> RoundRow:
    fields = {}
    if known is not None:
        fields = {
            "server_epsilon_sample_known": known,
            "server_epsilon_sample_known_replace_one": 2.5 * known,
        }
    return RoundRow(
        round=rnd,
        sites_sampled=2,
        sites_replied=2,
        sites_failed=0,
        train_loss=1.0,
        eval_loss=1.0 - 0.1 * rnd,
        eval_accuracy=0.5 + 0.1 * rnd,
        seconds=0.5,
        bytes_down=10,
        bytes_up=10,
        server_epsilon=server,
        extra=fields,
        **extra,
    )


def _record(tmp_path: Path, overrides: list[str], rows: list[RoundRow]) -> RecordWriter:
    record = RecordWriter(tmp_path / "run", resolve(overrides=overrides))
    record.set_initial(loss=2.0, accuracy=0.1)
    for row in rows:
        record.append(row)
    return record


def _summary(record: RecordWriter) -> str:
    write_summary(record, record.path / "summary.md", status="completed", reason="")
    return (record.path / "summary.md").read_text()


def test_a_skipped_last_round_prints_the_epsilon_spent_so_far(tmp_path):
    """Attacks `server_epsilon -` after a last round that released nothing (issue 20, point 6)."""
    rows = [_row(1, 1.5, known=1.0), _row(2, 3.296, known=2.0), _row(3, math.nan)]
    summary = _summary(_record(tmp_path, SITE_LEVEL, rows))
    assert "`server_epsilon` 3.296 (spent so far: round 3 released nothing)" in summary
    assert "`server_epsilon` -" not in summary
    assert "`server_epsilon_sample_known` 2.000" in summary


def test_every_epsilon_line_of_the_summary_names_its_relation(tmp_path):
    """Attacks epsilons printed without their neighbouring relation (zero-out, replace-one)."""
    rows = [_row(1, 1.5, known=1.0, site_epsilon={"0": 0.4})]
    summary = _summary(_record(tmp_path, [*SITE_LEVEL, *RECORD_LEVEL], rows))
    for relation in (RECORD_RELATION, *(r.value for r in SiteRelation)):
        assert relation in summary, relation
    assert "`server_epsilon_sample_known_replace_one` 2.500" in summary
    numbered = [line for line in summary.splitlines() if re.search(r"epsilon[a-z_]*`? \d", line)]
    assert len(numbered) >= 4
    assert all("relation" in line for line in numbered), numbered


def test_a_per_run_federation_ledger_is_said_and_a_kept_one_is_not(tmp_path):
    """Attacks a summary silent on a federation ledger that starts at zero each run (point 5)."""
    per_run = _summary(_record(tmp_path / "a", SITE_LEVEL, [_row(1, 1.5, known=1.0)]))
    assert "ledger is per run: it started at zero" in per_run
    assert "dp.server.state_dir" in per_run
    kept = [*SITE_LEVEL, f"dp.server.state_dir={tmp_path / 'state'}"]
    summary = _summary(_record(tmp_path / "b", kept, [_row(1, 1.5, known=1.0)]))
    assert "per run" not in summary and "kept across runs" in summary


def test_the_privacy_plot_names_its_axis_and_each_line_its_relation(tmp_path):
    """Attacks a 73-line plot function whose lines named no relation."""
    rows = [_row(1, 1.5, known=1.0, site_epsilon={"0": 0.4}), _row(2, math.nan)]
    fig = privacy_figure(_record(tmp_path, [*SITE_LEVEL, *RECORD_LEVEL], rows))
    (ax,) = fig.axes
    assert ax.get_xlabel() == "round"
    labels = [t.get_text().replace("\n", " ") for t in ax.get_legend().get_texts()]
    # budget lines (site, federation) and the three site-level curves; the site curves are
    # withheld under site-level DP (they would reveal who was sampled)
    assert len(labels) == 5 and all("relation:" in label for label in labels), labels
    for relation in (RECORD_RELATION, *(r.value for r in SiteRelation)):
        assert any(relation in label for label in labels), relation
    budget = next(label for label in labels if label.startswith("federation budget"))
    assert SiteRelation.ADD_REMOVE.value in budget  # it binds the amplified epsilon


def test_close_record_writes_the_report_and_then_the_status(tmp_path):
    """Attacks nothing new: the one closing call still leaves every file a person and a program
    read, with the plots as PNGs."""
    record = _record(tmp_path, [*SITE_LEVEL, *RECORD_LEVEL], [_row(1, 1.5, known=1.0)])
    close_record(record, status="completed")
    for name in ("accuracy.png", "privacy.png"):
        assert (record.path / name).read_bytes()[:4] == b"\x89PNG"
    assert "completed" in (record.path / "summary.md").read_text()
    assert json.loads((record.path / STATUS_FILE).read_text())["status"] == "completed"


def test_the_report_reads_no_dp_settings_even_through_an_alias():
    """Attacks `dp = record.settings.dp` in the report: no `.dp` attribute is read at all."""
    tree = ast.parse((ROOT / "fedcore" / "report.py").read_text())
    reads = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "dp"]
    assert reads == []


@pytest.mark.parametrize("overrides", [[], SITE_LEVEL])
def test_the_record_finishes_without_importing_the_report(tmp_path, overrides):
    """Attacks the report <-> runrecord cycle: `finish` imported the report lazily."""
    script = (
        "import json, sys\n"
        "from fedcore.config import resolve\n"
        "from fedcore.runrecord import RecordWriter\n"
        f"record = RecordWriter(sys.argv[1], resolve(overrides={overrides!r}))\n"
        "record.finish(status='completed')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('fedcore.report'))))\n"
    )
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", script, str(out)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
    assert (out / STATUS_FILE).exists() and not (out / "summary.md").exists()
