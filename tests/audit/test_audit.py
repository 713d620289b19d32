"""fedcore audit end to end: fedcore's DP-SGD holds up, the control exceeds the claim, and a
broken noise scale is caught (the audit attacked with the bug it exists to find)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedcore import config as cfg
from fedcore.audit.run import audit
from fedcore.cli import main
from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError
from fedcore.privacy import dpsgd, dpsgd_step, fused_clip

SMALL = ["rounds=3", "local_epochs=2", "batch_size=32"]  # site 0: 115 records, q = 0.28, 24 steps


def test_audit_of_fedcore_dp_sgd_stays_below_the_claim_and_the_control_exceeds_it() -> None:
    settings = cfg.resolve(overrides=[*SMALL, "dp.site.epsilon=2"])
    report = audit(settings, canaries=2000, rng=CryptoRng.from_seed(14, purpose="audit test"))
    assert 1.99 < report.epsilon_formal <= 2.0  # the ledger charged what the site would
    assert report.steps == 24 and report.guesses == 2000 and report.canaries == 2000
    assert report.grad_sample_mode == "ghost"
    assert 0.0 <= report.epsilon_lower_bound <= report.epsilon_formal
    assert report.correct > 1000  # the noisy run still leaks something the audit sees
    assert report.control.correct >= 1995  # an included canary never sampled (0.722^24) is missed
    assert report.control.epsilon_lower_bound > report.epsilon_formal
    assert report.strong_enough and "<= the formal epsilon" in report.verdict
    assert f"above {report.detects_above:.3g}" in report.verdict


def test_controls_state_the_power_and_refute_a_mechanism_without_noise() -> None:
    settings = cfg.resolve(overrides=[*SMALL, "dp.site.epsilon=2"])
    report = audit(settings, canaries=2000, rng=CryptoRng.from_seed(21, purpose="audit test"))
    by_name = {c.name: c for c in report.controls}
    assert len(report.controls) >= 3
    assert by_name["no noise"].refuted and math.isinf(by_name["no noise"].epsilon_true)
    assert any("clip" in name and c.refuted for name, c in by_name.items())
    weak = [c for c in report.controls if math.isfinite(c.epsilon_true)]
    assert weak and all(c.epsilon_true > report.epsilon_formal for c in weak)
    for c in report.controls:
        assert c.refuted == (c.epsilon_lower_bound > report.epsilon_formal)
    refuted = [c.epsilon_true for c in report.controls if c.refuted]
    assert report.detects_above == min(refuted)
    assert report.strong_enough == math.isfinite(report.detects_above)


def test_too_few_canaries_for_any_power_is_said_plainly() -> None:
    """20 canaries at epsilon 0.5 once printed "strong enough" and exited 0."""
    settings = cfg.resolve(overrides=[*SMALL, "dp.site.epsilon=0.5"])
    report = audit(settings, canaries=20, rng=CryptoRng.from_seed(22, purpose="audit test"))
    assert not report.strong_enough
    assert report.verdict.startswith("too weak") and "could have refuted" not in report.verdict


def test_disabling_the_real_steps_clipping_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The canaries go through the site's clipper: a clipper that stops clipping lets their
    100 C gradients through, and the audit refutes the claim (canaries added after clipping, as
    the audit once did, would not see it)."""
    honest = fused_clip.FusedClipper.clipped_sum

    def unclipped(self, loss_sum):  # noqa: ANN001, ANN202
        bound, self.max_grad_norm = self.max_grad_norm, math.inf
        try:
            return honest(self, loss_sum)
        finally:
            self.max_grad_norm = bound

    monkeypatch.setattr(fused_clip.FusedClipper, "clipped_sum", unclipped)
    settings = cfg.resolve(overrides=[*SMALL, "dp.site.epsilon=1"])
    report = audit(settings, canaries=1000, rng=CryptoRng.from_seed(23, purpose="audit test"))
    assert report.epsilon_lower_bound > report.epsilon_formal and "REFUTED" in report.verdict


def test_disabling_the_real_steps_noise_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_noise(sums, *, std, max_grad_norm, rng):  # noqa: ANN001, ANN202
        return [s.detach().clone() for s in sums]

    monkeypatch.setattr(dpsgd_step, "release_noised_sum", no_noise)
    settings = cfg.resolve(overrides=[*SMALL, "dp.site.epsilon=1"])
    report = audit(settings, canaries=1000, rng=CryptoRng.from_seed(24, purpose="audit test"))
    assert report.epsilon_lower_bound > report.epsilon_formal and "REFUTED" in report.verdict


def test_a_noise_scale_bug_is_refuted(monkeypatch: pytest.MonkeyPatch) -> None:
    """An implementation that adds a twentieth of the noise it accounts for fails its audit. The
    bug is put where every DP-SGD step releases its sum (``release_noised_sum``), and the audit
    runs the step a site runs (the fused clipper for the bundled MLP), so it finds it."""
    honest = dpsgd_step.release_noised_sum

    def buggy(sums, *, std, max_grad_norm, rng):  # noqa: ANN001, ANN202
        return honest(sums, std=std / 20, max_grad_norm=max_grad_norm, rng=rng)

    monkeypatch.setattr(dpsgd_step, "release_noised_sum", buggy)
    settings = cfg.resolve(overrides=[*SMALL, "dp.site.epsilon=1"])
    report = audit(settings, canaries=2000, rng=CryptoRng.from_seed(15, purpose="audit test"))
    assert report.grad_sample_mode == "ghost"  # the production step, not Opacus's hooks
    assert report.epsilon_lower_bound > report.epsilon_formal
    assert "REFUTED" in report.verdict


def test_the_audit_runs_the_step_a_site_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug only in the fused step (the one sites run) is still found: the audit does not fall
    back to another implementation that lacks it."""
    honest = dpsgd.FusedDPStep.release

    def buggy(self, sums):  # noqa: ANN001, ANN202
        claimed = self.std
        self.std = claimed / 20
        try:
            return honest(self, sums)
        finally:
            self.std = claimed

    monkeypatch.setattr(dpsgd.FusedDPStep, "release", buggy)
    settings = cfg.resolve(overrides=[*SMALL, "dp.site.epsilon=1"])
    report = audit(settings, canaries=2000, rng=CryptoRng.from_seed(17, purpose="audit test"))
    assert "REFUTED" in report.verdict


def test_a_control_that_cannot_reach_the_claim_says_the_audit_is_too_weak() -> None:
    settings = cfg.resolve(overrides=[*SMALL, "dp.site.epsilon=8"])
    report = audit(settings, canaries=200, rng=CryptoRng.from_seed(16, purpose="audit test"))
    assert report.control.epsilon_lower_bound < 8
    assert not report.strong_enough and report.verdict.startswith("too weak")


def test_audit_needs_record_level_dp() -> None:
    with pytest.raises(ConfigError, match="dp.site.epsilon"):
        audit(cfg.resolve(overrides=SMALL), canaries=100)


def test_cli_writes_audit_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["audit", "--canaries", "2000", "--out", str(tmp_path)]
    for item in [*SMALL, "dp.site.epsilon=2"]:
        argv += ["--set", item]
    assert main(argv) in (0, 1)
    doc = json.loads((tmp_path / "audit.json").read_text())
    for key in (
        "epsilon_formal",
        "epsilon_lower_bound",
        "confidence",
        "canaries",
        "guesses",
        "correct",
    ):
        assert np.isfinite(doc[key])
    assert doc["confidence"] == 0.95 and doc["canaries"] == 2000
    assert doc["control"]["epsilon_lower_bound"] > doc["epsilon_formal"]
    assert len(doc["controls"]) >= 3
    for c in doc["controls"]:
        assert set(c) == {"name", "epsilon_true", "epsilon_lower_bound", "refuted"}
    refuted = [c["epsilon_true"] for c in doc["controls"] if c["refuted"]]
    finite = [e for e in refuted if e is not None]  # null: no finite epsilon
    assert doc["detects_above"] == (min(finite) if finite else None)
    printed = capsys.readouterr().out
    assert "empirical lower bound" in printed
    if doc["detects_above"] is not None:
        assert f"above {doc['detects_above']:.3g}" in printed
    assert main(argv) == 2  # never overwrites an audit
    assert main(["audit", "--canaries", "many", "--out", str(tmp_path / "x")]) == 2
