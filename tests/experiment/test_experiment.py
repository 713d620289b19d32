"""fedcore.experiment: spec checks, planning, and a whole experiment with a stand-in simulate.

The stand-in (``fake_simulate.py``) writes a run record without starting Flower, so these tests
check the experiment machinery (every file, resuming, interrupted and failed points) in seconds;
``tests/experiments/test_bundled_specs.py`` runs real ``fedcore simulate`` runs (slow).
"""

from __future__ import annotations

import csv
import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcore.errors import ConfigError
from fedcore.experiment import Mode, parse_spec, plan
from fedcore.experiment.plan import Point
from fedcore.experiment.plots import write_plots
from fedcore.experiment.results import CSPRNG_NOTE, collect, mean_interval, write_csv
from fedcore.experiment.runner import AUDIT, is_finished, log_path, prepare, run_dir, run_points
from fedcore.experiment.summary import write_summary
from tests.experiment.fake_simulate import (
    NUM_EXAMPLES,
    SERVER_NOISE,
    SITE_NOISE,
    SITE_RATE,
    TRAIN_LOSS,
)

FAKE = Path(__file__).with_name("fake_simulate.py")

TINY = """
[experiment]
name = "tiny"

[base]
dataset = "synthetic"
sites = 3
rounds = 2
local_epochs = 1

[axes]
mode = ["none", "record", "site-secagg"]
epsilon = [2, 8]
seed = [0, 1]
"""


def test_plan_gives_each_mode_its_budget_and_shares_the_rest() -> None:
    points = plan(parse_spec(TINY))
    # none ignores epsilon: 2 seeds; record and site-secagg: 2 epsilons x 2 seeds each.
    assert len(points) == 2 + 4 + 4
    by_id = {p.run_id: p for p in points}
    none = by_id["mode-none_seed-0"]
    assert none.swept["epsilon"] is None and "dp.site.epsilon" not in none.settings
    record = by_id["mode-record_epsilon-2_seed-1"].settings
    assert record["dp.site.epsilon"] == 2.0 and "dp.server.epsilon" not in record
    secagg = by_id["mode-site-secagg_epsilon-8_seed-0"].settings
    assert secagg["dp.server.epsilon"] == 8.0 and secagg["secagg.enabled"] is True
    shared = {"dataset", "sites", "rounds", "local_epochs"}
    for p in points:  # fair by default: the same training settings at every point
        assert {k: p.settings[k] for k in shared} == {k: points[0].settings[k] for k in shared}
    assert "secagg.enabled=true" in by_id["mode-site-secagg_epsilon-8_seed-0"].overrides()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[axes]\nmode = ["record"]', "needs an 'epsilon' axis"),
        ("[axes]\nepsilon = [1]", "needs an axis 'mode'"),
        ('[axes]\nmode = ["record", "nonsense"]\nepsilon = [1]', "axis 'mode' takes"),
        (
            '[base]\ndp.distributed.epsilon = 3\n[axes]\nmode = ["distributed"]\nepsilon = [1]',
            "chosen by the 'mode' axis",
        ),
        ('[axes]\nmode = ["distributed"]\nepsilon = [1]\n[base]\nsites = 1', "at least 2 sites"),
        ('[axes]\nmode = ["record"]\nepsilon = [0]', "finite numbers > 0"),
        ('[axes]\nmode = ["site"]\nepsilon = [1]\naudit = true', "has no 'record'"),
        ('[axes]\nmode = ["record"]\nepsilon = [1]\naudit = "yes"', "is a switch"),
        (
            '[base]\ndp.site.epsilon = 3\n[axes]\nmode = ["record"]\nepsilon = [1]',
            "chosen by the 'mode' axis",
        ),
        ("[base]\nno_such_key = 1", "unknown setting 'no_such_key'"),
        ("[base]\nrounds = 0", "'rounds' must be >= 1"),
        ("[axes]\nlr = []", "non-empty list"),
        ("[axes]\nnot_a_setting = [1, 2]", "neither 'mode'"),
        ("[axes]\nseed = [1, 1]", "repeats a value"),
        ('[axes]\nmode = ["site-secagg"]\nepsilon = [1]\n[base]\nsites = 1', "at least 2 sites"),
        ("[surprise]\nx = 1", "unknown table"),
    ],
)
def test_bad_specs_are_refused_before_anything_runs(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan(parse_spec(text))


def test_quick_applies_the_quick_table_and_needs_one() -> None:
    text = TINY + "\n[quick]\nrounds = 1\n[quick.axes]\nseed = [0]\n"
    quick = parse_spec(text, quick=True)
    assert quick.base["rounds"] == 1 and quick.axis("seed") == (0,)
    assert parse_spec(text).base["rounds"] == 2
    with pytest.raises(ConfigError, match=r"\[quick\] table"):
        parse_spec(TINY, quick=True)


def test_per_mode_settings_are_listed_as_a_difference(tmp_path: Path) -> None:
    text = TINY + "\n[modes.record]\nlr = 2.0\n"
    spec = parse_spec(text)
    points = plan(spec)
    assert all(p.settings.get("lr") == 2.0 for p in points if p.mode is Mode.RECORD)
    assert all("lr" not in p.settings for p in points if p.mode is not Mode.RECORD)
    results = collect(points, out=tmp_path)  # nothing run: every row "not run"
    write_summary(results, spec, tmp_path / "summary.md", plots=[])
    summary = (tmp_path / "summary.md").read_text()
    assert "| `lr` | 0.2, 2 | `[modes.record]` |" in summary


def _fake(calls: Path):  # noqa: ANN202
    return lambda point, out: (
        [sys.executable, str(FAKE), str(calls), "--out", str(run_dir(out, point.run_id))]
        + [a for item in point.overrides() for a in ("--set", item)]
    )


def _run(text: str, out: Path, calls: Path) -> list[Point]:
    spec = parse_spec(text)
    points = plan(spec)
    prepare(out, spec_text=text, spec=spec, points=points)
    run_points(points, out=out, jobs=2, command=_fake(calls))
    results = collect(points, out=out)
    write_csv(results, spec, out / "results.csv")
    plots = write_plots(results, spec, out)
    write_summary(results, spec, out / "summary.md", plots=plots)
    return points


def test_experiment_writes_every_file_and_a_rerun_runs_nothing_finished(tmp_path: Path) -> None:
    out, calls = tmp_path / "exp", tmp_path / "calls.txt"
    points = _run(TINY, out, calls)
    assert sorted(calls.read_text().split()) == sorted(p.run_id for p in points)
    assert (out / "spec.toml").read_text() == TINY
    assert json.loads((out / "plan.json").read_text())["points"].keys() == {
        p.run_id for p in points
    }

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(points)
    by_id = {r["run_id"]: r for r in rows}
    rec = by_id["mode-record_epsilon-8_seed-1"]
    assert (rec["mode"], rec["epsilon"], rec["seed"]) == ("record", "8", "1")
    assert float(rec["final_accuracy"]) == pytest.approx(0.62)
    assert float(rec["best_accuracy"]) == pytest.approx(0.62)
    assert float(rec["record_epsilon"]) == pytest.approx(8.0)  # the largest site's, last round
    assert rec["server_epsilon"] == "" and rec["status"] == "completed"
    assert (rec["rounds_completed"], rec["rounds_planned"], rec["returncode"]) == ("2", "2", "0")
    sec = by_id["mode-site-secagg_epsilon-2_seed-0"]
    assert float(sec["server_epsilon"]) == pytest.approx(2.0)
    assert float(sec["server_epsilon_sample_known"]) == pytest.approx(4.0)
    assert by_id["mode-none_seed-0"]["epsilon"] == ""
    assert Path(rec["run_dir"]) == out / "runs" / "mode-record_epsilon-8_seed-1"

    # The binding mechanism's figures: site 0's (the larger epsilon), the federation's.
    assert (rec["epsilon_spent"], rec["delta"], rec["steps"]) == ("8.0", "1e-05", "48")
    assert float(rec["noise_multiplier"]) == SITE_NOISE and float(rec["sampling_rate"]) == SITE_RATE
    assert float(sec["noise_multiplier"]) == SERVER_NOISE and sec["steps"] == "2"
    assert (sec["epsilon_spent"], sec["sampling_rate"]) == ("2.0", "1.0")

    summary = (out / "summary.md").read_text()
    # The mean over seeds 0 and 1 (0.52 and 0.62) with its 95 % t interval (12.71 * 0.05 =
    # 0.635), every column at one precision; the mechanism's figures beside the epsilon.
    assert "| record | 8 | 2 | 8.000 | 1e-05 | 1.235 | 0.0417 | 48 | 0.570 ± 0.635 |" in summary
    assert "| site-secagg | 2 | 2 | 2.000 | 1e-05 | 2.820 | 1.0000 | 2 | 0.570 ± 0.635 |" in summary
    assert "| none | - | 2 | - | - | - | - | - | 0.570 ± 0.635 |" in summary
    assert "| site-secagg | 8 | 2 | - | 8.000 | 16.000 |" in summary  # each observer's epsilon
    assert CSPRNG_NOTE in summary
    assert "| `seed` | 0, 1 | axis |" in summary
    for name in ("accuracy_vs_epsilon.png", "epsilon_per_round.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"`{name}`" in summary

    before = (out / "results.csv").read_text()
    calls.unlink()
    _run(TINY, out, calls)  # the rerun: every point finished, nothing runs again
    assert not calls.exists()
    assert (out / "results.csv").read_text() == before


def test_an_interrupted_point_runs_again_and_a_failed_one_is_a_result(tmp_path: Path) -> None:
    text = TINY.replace("seed = [0, 1]", "seed = [0, 99]").replace('"none", ', "")
    out, calls = tmp_path / "exp", tmp_path / "calls.txt"
    points = _run(text, out, calls)
    rows = {r["run_id"]: r for r in csv.DictReader((out / "results.csv").open())}
    failed = rows["mode-record_epsilon-2_seed-99"]
    assert (failed["returncode"], failed["rounds_completed"]) == ("1", "1")
    assert "exited 1" in failed["status"]
    assert "did not complete every round" in (out / "summary.md").read_text()

    victim = points[0].run_id  # as if the experiment had been killed during this run
    (out / "runs" / f"{victim}.done.json").unlink()
    (out / "runs" / victim / "stale-partial-file").write_text("x")
    calls.unlink()
    _run(text, out, calls)
    assert calls.read_text().split() == [victim]
    assert not (out / "runs" / victim / "stale-partial-file").exists()


def test_another_spec_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    spec = parse_spec(TINY)
    prepare(tmp_path, spec_text=TINY, spec=spec, points=plan(spec))
    other = TINY.replace("rounds = 2", "rounds = 3")
    with pytest.raises(ConfigError, match="another experiment"):
        prepare(tmp_path, spec_text=other, spec=parse_spec(other), points=plan(parse_spec(other)))
    quick_text = TINY + "\n[quick]\nrounds = 1\n"
    prepare(tmp_path / "q", spec_text=quick_text, spec=parse_spec(quick_text), points=[])
    with pytest.raises(ConfigError, match="without --quick"):
        prepare(
            tmp_path / "q", spec_text=quick_text, spec=parse_spec(quick_text, quick=True), points=[]
        )


def test_mean_interval_is_the_student_t_interval() -> None:
    interval = mean_interval([1.0, 2.0, 3.0, None])
    assert interval is not None and interval.n == 3 and interval.mean == 2.0
    assert interval.half_width == pytest.approx(4.302652729911275 * 1.0 / 3**0.5)
    assert mean_interval([0.5]).half_width is None  # type: ignore[union-attr]
    assert mean_interval([None]) is None


def test_audit_switch_audits_record_points_into_results_and_a_plot(tmp_path: Path) -> None:
    text = TINY.replace("seed = [0, 1]", "seed = [0, 1]\naudit = true")
    spec = parse_spec(text)
    assert spec.audit and "audit" not in dict(spec.axes)
    out, calls = tmp_path / "exp", tmp_path / "calls.txt"
    points = _run(text, out, calls)
    record = [p for p in points if p.mode is Mode.RECORD]

    def fake_audit(point: Point, out: Path) -> list[str]:
        return [
            sys.executable,
            str(FAKE),
            str(calls),
            "--audit",
            "--out",
            str(run_dir(out, point.run_id, AUDIT)),
        ] + [a for item in point.overrides() for a in ("--set", item)]

    run_points(record, out=out, jobs=2, suffix=AUDIT, command=fake_audit)
    results = collect(points, out=out)
    write_csv(results, spec, out / "results.csv")
    plots = write_plots(results, spec, out)
    assert "audit.png" in plots and (out / "audit.png").read_bytes()[:4] == b"\x89PNG"
    rows = {r["run_id"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert float(rows["mode-record_epsilon-8_seed-0"]["audit_epsilon_lower_bound"]) == 2.0
    assert float(rows["mode-record_epsilon-8_seed-0"]["audit_control_epsilon_lower_bound"]) == 8.2
    assert rows["mode-site-secagg_epsilon-8_seed-0"]["audit_epsilon_lower_bound"] == ""
    calls.unlink()
    run_points(record, out=out, jobs=2, suffix=AUDIT, command=fake_audit)  # resumed: nothing
    assert not calls.exists()


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """umask 022, the usual one, under which a plain ``open`` makes a world-readable file."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _world_readable(path: Path, root: Path) -> bool:
    """Whether another user can read ``path``: it grants read to others, and every folder from
    ``root`` down to it grants them passage."""
    folders = [root, *(root / p for p in reversed(path.relative_to(root).parents) if str(p) != ".")]
    if not path.stat().st_mode & stat.S_IROTH:
        return False
    return all(folder.stat().st_mode & stat.S_IXOTH for folder in folders)


SITE_LEVEL = TINY.replace('"none", "record", "site-secagg"', '"site", "site-secagg"').replace(
    "seed = [0, 1]", "seed = [0]"
)


@pytest.mark.usefixtures("usual_umask")
def test_a_site_level_dp_experiment_leaves_no_world_readable_loss_or_sample_count(
    tmp_path: Path,
) -> None:
    out, calls = tmp_path / "exp", tmp_path / "calls.txt"
    points = _run(SITE_LEVEL, out, calls)
    markers = (f"{TRAIN_LOSS:.4f}", str(NUM_EXAMPLES), "train_loss", "num_examples")
    seen_private = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        text = path.read_bytes().decode(errors="replace")
        leaked = [m for m in markers if m in text]
        if _world_readable(path, out):
            assert not leaked, f"{path.relative_to(out)} is world-readable and holds {leaked}"
        elif leaked:
            seen_private.append(path.relative_to(out).as_posix())
    # The console output of every point was written, owner-only, in an owner-only folder.
    for p in points:
        log = log_path(out, p.run_id)
        assert f"loss {TRAIN_LOSS:.4f}" in log.read_text()
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "logs").stat().st_mode) == 0o700
    assert {f"logs/{p.run_id}.log" for p in points} <= set(seen_private)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["status"] for r in rows} == {"completed"} and all(r["server_epsilon"] for r in rows)


@pytest.mark.usefixtures("usual_umask")
def test_a_rerun_makes_an_old_world_readable_log_owner_only(tmp_path: Path) -> None:
    spec = parse_spec(SITE_LEVEL)
    (tmp_path / "runs").mkdir(parents=True)
    old = tmp_path / "runs" / "mode-site_epsilon-2_seed-0.log"
    old.write_text(f"round 1/2  loss {TRAIN_LOSS}\n")  # where an older fedcore left it, 0644
    prepare(tmp_path, spec_text=SITE_LEVEL, spec=spec, points=plan(spec))
    moved = log_path(tmp_path, "mode-site_epsilon-2_seed-0")
    assert not old.exists() and stat.S_IMODE(moved.stat().st_mode) == 0o600
    assert str(TRAIN_LOSS) in moved.read_text()


@pytest.mark.parametrize("how", ["130", "143", "kill"])
def test_a_point_stopped_by_a_signal_is_no_result_and_runs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    text = TINY.replace('"none", ', "").replace("seed = [0, 1]", "seed = [0]")
    out, calls = tmp_path / "exp", tmp_path / "calls.txt"
    victim = "mode-record_epsilon-2_seed-0"
    monkeypatch.setenv("FAKE_SIMULATE_STOP", f"{victim}:{how}")
    points = _run(text, out, calls)
    assert victim in {p.run_id for p in points} and not is_finished(out, victim)
    rows = {r["run_id"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert "stopped by a signal" in rows[victim]["status"]
    assert rows[victim]["returncode"] == ("-9" if how == "kill" else how)
    summary = (out / "summary.md").read_text()
    assert f"- **Runs**: {len(points)} planned, {len(points) - 1} finished" in summary
    assert f"`{victim}`: stopped by a signal" in summary

    monkeypatch.delenv("FAKE_SIMULATE_STOP")
    calls.unlink()
    _run(text, out, calls)  # the rerun starts the stopped point again, and only it
    assert calls.read_text().split() == [victim]
    rows = {r["run_id"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert (rows[victim]["returncode"], rows[victim]["rounds_completed"]) == ("0", "2")
    assert is_finished(out, victim)


def test_the_command_counts_a_stopped_point_as_unfinished_and_reruns_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedcore.cli import main
    from fedcore.experiment import runner

    text = TINY.replace('"none", ', "").replace("seed = [0, 1]", "seed = [0]")
    (tmp_path / "spec.toml").write_text(text)
    out, calls = tmp_path / "exp", tmp_path / "calls.txt"
    monkeypatch.setattr(runner, "simulate_command", lambda point, out: _fake(calls)(point, out))
    argv = ["experiment", str(tmp_path / "spec.toml"), "--out", str(out)]
    victim = "mode-record_epsilon-8_seed-0"
    monkeypatch.setenv("FAKE_SIMULATE_STOP", f"{victim}:143")
    assert main(argv) == 1
    monkeypatch.delenv("FAKE_SIMULATE_STOP")
    calls.unlink()
    capsys.readouterr()
    assert main(argv) == 0
    console = capsys.readouterr()
    err = " ".join(console.err.split())  # as one line: the console wraps at its width
    assert "4 runs (3 already finished)" in err
    assert f"point {victim} was stopped by a signal (exit 143): running it again" in err
    assert err.count("was stopped by a signal") == 1  # the finished points: not a word
    assert calls.read_text().split() == [victim]
    assert CSPRNG_NOTE in console.out  # every point here has DP

    calls.unlink()
    assert main(argv) == 0  # the rerun point finished: nothing runs, nothing is said of it
    assert "was stopped by a signal" not in capsys.readouterr().err
    assert not calls.exists()


def test_the_console_names_how_a_point_was_stopped() -> None:
    from fedcore.experiment.runner import exit_text

    assert (exit_text(143), exit_text(130), exit_text(-9)) == (
        "exit 143",
        "exit 130",
        "killed by SIGKILL",
    )
    assert exit_text(-200) == "killed by signal 200"


def test_client_cpus_above_the_cores_is_warned_on_the_experiments_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A point's own warning goes to its log; the experiment says it once, before anything runs."""
    from fedcore.cli import main
    from fedcore.cli.experiment import cpu_warnings
    from fedcore.experiment import runner

    text = TINY.replace("local_epochs = 1", "local_epochs = 1\nclient_cpus = 64")
    points = plan(parse_spec(text))
    (warning,) = cpu_warnings(points, cores=2)  # once, not once per point
    assert "client_cpus=64" in warning and "2 CPU cores" in warning and "client_cpus=2" in warning
    assert cpu_warnings(points, cores=64) == []
    (tmp_path / "spec.toml").write_text(text.replace("seed = [0, 1]", "seed = [0]"))
    calls = tmp_path / "calls.txt"
    monkeypatch.setattr(runner, "simulate_command", lambda point, out: _fake(calls)(point, out))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert main(["experiment", str(tmp_path / "spec.toml"), "--out", str(tmp_path / "exp")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("client_cpus=64 is more than the 2 CPU cores") == 1
    assert err.index("client_cpus=64") < err.index("fedcore experiment 'tiny'")  # before the runs
