"""The experiment's plots as a paper needs them (issue 25 point 5): no legend over the points,
the dashed sample-known line visible, delta in the title, accuracy by round across modes."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path

import pytest

from fedcore.experiment import parse_spec, plan
from fedcore.experiment.plots import (
    accuracy_per_round_figure,
    accuracy_vs_epsilon_figure,
    audit_figure,
    epsilon_per_round_figure,
    setting_vs_accuracy_figure,
    write_plots,
)
from fedcore.experiment.results import RunResult, collect
from fedcore.experiment.runner import run_dir
from tests.experiment import fake_simulate
from tests.experiment.test_experiment import TINY

SWEEP = TINY.replace("seed = [0, 1]", "seed = [0, 1]\nlr = [0.1, 0.2]").replace(
    "epsilon = [2, 8]", "epsilon = [2]"
)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[RunResult]:
    """The run records of SWEEP as the stand-in writes them, in this process (fast)."""
    tmp = tmp_path_factory.mktemp("plots")
    points = plan(parse_spec(SWEEP))
    with contextlib.redirect_stdout(io.StringIO()):
        for point in points:
            sets = [a for item in point.overrides() for a in ("--set", item)]
            fake_simulate.main(
                [str(tmp / "calls.txt"), "--out", str(run_dir(tmp, point.run_id))] + sets
            )
    return collect(points, out=tmp)


def _overlap(a, b) -> bool:  # noqa: ANN001 - two matplotlib Bboxes
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize(
    "build",
    [
        accuracy_vs_epsilon_figure,
        epsilon_per_round_figure,
        accuracy_per_round_figure,
        audit_figure,
        lambda results: setting_vs_accuracy_figure(results, "lr"),
    ],
    ids=["accuracy_vs_epsilon", "epsilon_per_round", "accuracy_per_round", "audit", "lr"],
)
def test_no_legend_covers_the_axes(results: list[RunResult], build) -> None:  # noqa: ANN001
    fig = build(results)
    fig.canvas.draw()
    (ax,) = fig.axes
    legend = ax.get_legend()
    assert legend is not None and legend.get_texts()
    renderer = fig.canvas.get_renderer()
    assert not _overlap(legend.get_window_extent(renderer), ax.get_window_extent(renderer))


def test_titles_state_delta_of_the_private_points(results: list[RunResult]) -> None:
    for build in (accuracy_vs_epsilon_figure, epsilon_per_round_figure):
        assert "δ = 1e-05" in build(results).axes[0].get_title()
    without_dp = [r for r in results if not r.point.has_dp]
    assert "δ" not in accuracy_per_round_figure(without_dp).axes[0].get_title()


def _dashed(fig):  # noqa: ANN001, ANN202
    return [
        line
        for line in fig.axes[0].get_lines()
        if line.get_linestyle() not in ("-", "None") and "sample known" in line.get_label()
    ]


def test_the_dashed_sample_known_line_shows_even_where_it_equals_the_solid_one(
    results: list[RunResult],
) -> None:
    secagg = [
        r
        for r in results
        if r.point.run_id.startswith("mode-site-secagg") and r.point.run_id.endswith("lr-0.1")
    ]
    dashed = _dashed(epsilon_per_round_figure(secagg))
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == pytest.approx([2.0, 4.0])
    assert "the same" not in dashed[0].get_label()

    def equal(r: RunResult) -> RunResult:  # every site sampled: no amplification to lose
        rows = tuple(
            dataclasses.replace(row, server_epsilon_sample_known=row.server_epsilon)
            for row in r.per_round
        )
        return dataclasses.replace(r, per_round=rows)

    fig = epsilon_per_round_figure([equal(r) for r in secagg])
    (line,) = _dashed(fig)
    (solid,) = [x for x in fig.axes[0].get_lines() if x.get_linestyle() == "-"]
    assert list(line.get_ydata()) == list(solid.get_ydata())
    assert line.get_zorder() > solid.get_zorder() and line.get_linewidth() > solid.get_linewidth()
    assert "the same" in line.get_label()  # and the legend says why only one line seems drawn


def test_accuracy_per_round_has_one_line_per_point_across_modes(
    results: list[RunResult], tmp_path: Path
) -> None:
    fig = accuracy_per_round_figure(results)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert {"none, lr=0.1", "record, ε=2, lr=0.1", "site-secagg, ε=2, lr=0.2"} <= set(lines)
    assert len(lines) == 2 + 2 * 2  # none, then the two private modes, each at 2 lr
    # fake_simulate: 0.5 + 0.1 * seed + 0.01 * round; seeds 0 and 1
    assert list(lines["record, ε=2, lr=0.1"].get_ydata()) == pytest.approx([0.56, 0.57])
    assert fig.axes[0].get_xlabel() == "round"
    written = write_plots(results, parse_spec(SWEEP), tmp_path)
    assert "accuracy_per_round.png" in written
    assert (tmp_path / "accuracy_per_round.png").read_bytes()[:4] == b"\x89PNG"


def test_no_per_round_accuracy_no_accuracy_per_round_plot(tmp_path: Path) -> None:
    spec = parse_spec(TINY)
    nothing_run = collect(plan(spec), out=tmp_path)
    assert all(not r.accuracy_per_round for r in nothing_run)
    assert "accuracy_per_round.png" not in write_plots(nothing_run, spec, tmp_path)


def test_intervals_are_shaded_only_with_three_seeds_or_more(results: list[RunResult]) -> None:
    """Two seeds give a Student-t half-width of 12.7 standard errors: no band over the axes."""
    two = [
        r
        for r in results
        if r.point.run_id.startswith("mode-record") and "lr-0.1" in r.point.run_id
    ]
    assert len(two) == 2
    assert not accuracy_per_round_figure(two).axes[0].collections
    three = [*two, dataclasses.replace(two[0], accuracy_per_round=(0.6, 0.7))]
    (band,) = accuracy_per_round_figure(three).axes[0].collections
    assert band.get_paths()  # the 95 % interval, shaded
