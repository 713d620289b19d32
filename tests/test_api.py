"""The Python API (fedcore.api): settings, the run record reader, budget, and refusals.

Fast: no Ray, no Flower engine. The runs themselves are tests/test_examples.py (slow).
"""

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fedcore
from fedcore import config as cfg
from fedcore.errors import ConfigError, FedcoreError
from tests.federation.conftest import flower_identity  # noqa: F401 - a fixture

ROOT = Path(__file__).resolve().parents[1]


class Net:  # a module-level callable: importable by name
    pass


def test_import_fedcore_is_light_and_the_api_is_lazy():
    probe = (
        "import sys, fedcore\n"
        "before = sorted(m for m in sys.modules if m.startswith(('fedcore.', 'torch', 'flwr')))\n"
        "fedcore.settings(sites=2)\n"
        "after = sorted(m for m in sys.modules if m.startswith(('torch', 'flwr', 'ray')))\n"
        "print(before, after, 'simulate' in dir(fedcore))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "[]", "True"]


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'simulat'"):
        fedcore.simulat  # noqa: B018


def test_settings_from_keywords_dotted_keys_and_a_file(tmp_path):
    path = tmp_path / "fed.toml"
    path.write_text("sites = 4\nrounds = 7\n[dp.site]\nepsilon = 1.5\n")
    s = fedcore.settings({"rounds": 3, "secagg.enabled": True}, file=path, lr=0.5)
    # defaults, then the file, then the dict, then the keywords
    assert (s.sites, s.rounds, s.lr, s.dp.site.epsilon, s.secagg.enabled) == (4, 3, 0.5, 1.5, True)
    assert s == cfg.resolve(file=path, overrides=["rounds=3", "secagg.enabled=true", "lr=0.5"])
    assert fedcore.settings() == fedcore.Settings()


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"rounds": 0}, "'rounds' must be >= 1, got 0"),
        ({"dp.site.epsilonn": 2.0}, "did you mean 'dp.site.epsilon'"),
        ({"sites": "3"}, "'sites' must be an integer, got '3'"),
        ({"strategy": "fedsgd"}, "'strategy' must be one of"),
        ({"dp.site.noise_multiplier": 1.0}, "'dp.site.epsilon' is unset"),
    ],
)
def test_a_bad_setting_is_a_config_error_naming_it(values, named):
    with pytest.raises(ConfigError, match="setting") as caught:
        fedcore.settings(values)
    assert named in str(caught.value)


def test_a_missing_settings_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml' does not exist"):
        fedcore.settings(file=tmp_path / "nope.toml")


def test_override_copies_and_checks():
    base = fedcore.settings(sites=3)
    private = fedcore.override(base, **{"dp.site.epsilon": 4.0})
    assert (private.sites, private.dp.site.epsilon, base.dp.site.epsilon) == (3, 4.0, None)
    assert fedcore.override(private, {"dp.site.epsilon": None}).dp.site.epsilon is None
    with pytest.raises(ConfigError, match="'dp.site.delta' must be < 1"):
        fedcore.override(base, **{"dp.site.delta": 1.0})


def test_the_runs_hand_the_commands_work_the_settings_object_itself(tmp_path, monkeypatch):
    """No option names and no `--set` text between the API and the commands' work: a value that
    `--set` would strip (" label") arrives as it was given, and out= wins over the setting."""
    from fedcore.cli import deploy_local as deploy_command
    from fedcore.cli import simulate as simulate_command

    seen = []

    def work(settings, out_dir, *, verbose=False):
        seen.append((settings, out_dir, verbose))
        return 2  # refused: no record, so the API raises FedcoreError

    monkeypatch.setattr(simulate_command, "simulate", work)
    monkeypatch.setattr(deploy_command, "deploy_local", work)
    given = fedcore.settings(sites=3, label_column=" label", out=str(tmp_path / "setting"))
    with pytest.raises(FedcoreError, match="failed before its first round"):
        fedcore.simulate(given, out=tmp_path / "a", verbose=True)
    with pytest.raises(FedcoreError, match="fedcore deploy-local failed"):
        fedcore.deploy_local(given)
    (first, first_out, verbose), (second, second_out, _) = seen
    assert first == given and first.label_column == " label" and verbose
    assert first_out == tmp_path / "a"  # out= wins over the setting
    assert second == given and second_out == (tmp_path / "setting").resolve()
    with pytest.raises(ConfigError, match="'sites' must be >= 1"):  # unchecked Settings: checked
        fedcore.deploy_local(fedcore.Settings(sites=0))
    assert len(seen) == 2


def test_the_api_names_are_listed_once():
    import fedcore.api

    assert fedcore.api.__all__ == list(fedcore._API)
    public = {
        name
        for name, value in vars(fedcore.api).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(fedcore._API)  # every name the API imports is listed, and only those
    assert fedcore.RunRecord is fedcore.api.record.RunRecord


def test_model_reference():
    assert fedcore.model_reference("pkg.mod:build") == "pkg.mod:build"
    assert fedcore.model_reference(Net) == "tests.test_api:Net"

    def nested(*, input_shape, num_classes):
        return None

    for bad in (nested, lambda **kw: None):
        with pytest.raises(ConfigError, match="no importable name"):
            fedcore.model_reference(bad)


def _cli_budget(capsys, *args):
    from fedcore.cli import main

    assert main(["budget", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_budget_agrees_with_the_command(capsys):
    common = dict(sample_rate=0.05, steps=100, delta=1e-5)
    cli = ["--sample-rate", "0.05", "--steps", "100", "--delta", "1e-5"]
    forward = fedcore.budget(**common, noise_multiplier=1.1)
    assert forward.epsilon == _cli_budget(capsys, *cli, "--noise-multiplier", "1.1")["epsilon"]
    backward = fedcore.budget(**common, target_epsilon=forward.epsilon, accountant="rdp")
    doc = _cli_budget(
        capsys, *cli, "--target-epsilon", repr(forward.epsilon), "--accountant", "rdp"
    )
    assert (backward.noise_multiplier, backward.accountant) == (doc["noise_multiplier"], "rdp")
    assert backward.epsilon <= forward.epsilon  # RDP meets the target it was calibrated to


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(noise_multiplier=1.0, target_epsilon=1.0), "exactly one"),
        ({}, "exactly one"),
        (dict(noise_multiplier=1.0, accountant="moments"), "unknown accountant 'moments'"),
        (dict(noise_multiplier=1.0, delta=1.5), "delta must be in"),
        (dict(noise_multiplier=1.0, sample_rate=0.0), "sampling_rate must be in"),
    ],
)
def test_budget_refuses(kwargs, message):
    args = dict(sample_rate=0.1, steps=10, delta=1e-5) | kwargs
    with pytest.raises(ConfigError, match=message):
        fedcore.budget(**args)


def test_the_audit_needs_record_level_dp():
    with pytest.raises(ConfigError, match="set dp.site.epsilon"):
        fedcore.run_audit(fedcore.settings(sites=2))
    with pytest.raises(ConfigError, match="canaries must be an integer"):
        fedcore.run_audit(fedcore.settings(**{"dp.site.epsilon": 1.0}), canaries=2.5)


def test_no_record_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no run record"):
        fedcore.RunRecord(tmp_path)


@pytest.mark.usefixtures("flower_identity")
def test_the_record_of_a_real_server_run(tmp_path, monkeypatch):
    """The server's own run (fedcore's ServerApp driver over in-process sites, no Ray), read."""
    from fedcore.federation.server.serve import run_server
    from fedcore.federation.site.folders import SIMULATION_MARKER
    from tests.federation.conftest import FakeGrid, honest

    settings = fedcore.settings(
        sites=2,
        rounds=2,
        local_epochs=1,
        batch_size=64,
        dataset="synthetic",
        out=str(tmp_path / "run"),
        **{"synthetic.samples": 300, "dp.site.epsilon": 3.0},
    )
    monkeypatch.setenv(SIMULATION_MARKER, "1")  # sites keep their state under the record
    run_server(FakeGrid(settings, {1: honest, 2: honest}), settings, tmp_path / "run")
    record = fedcore.RunRecord(tmp_path / "run")
    assert record.status == "completed" and record.reason == ""
    assert record.settings == settings
    assert [row["round"] for row in record.history] == [1, 2] == list(range(1, 3))
    assert record.final_accuracy == record.history[-1]["eval_accuracy"]
    assert 0 < record.record_epsilon <= 3.0 and record.server_epsilon is None
    assert record.privacy["site_budget"]["epsilon"] == 3.0
    assert record.model_path.name == "model.pt" and "accuracy.png" in {p.name for p in record.plots}
    assert "completed" in repr(record) and record.summary.startswith("#")
    model = record.load_model()
    assert sum(p.numel() for p in model.parameters()) > 0
    with pytest.raises(AttributeError):
        record.path = tmp_path  # read-only


def test_the_runs_refuse_a_bad_setting_before_anything_starts(tmp_path):
    """deploy_local checks the settings before it starts a process; no folder is left."""
    bad = fedcore.settings(sites=2, model="no_such_module_here:Net")
    with pytest.raises(ConfigError, match="model 'no_such_module_here:Net' could not be loaded"):
        fedcore.deploy_local(bad, out=tmp_path / "deep" / "run")
    assert not (tmp_path / "deep").exists()
    with pytest.raises(ConfigError, match="does not exist"):
        fedcore.run_experiment(tmp_path / "missing.toml")
    assert isinstance(ConfigError("x"), FedcoreError)


def test_how_a_run_ended_becomes_a_result_or_an_exception(tmp_path):
    from fedcore.api.runs import _finished
    from fedcore.runrecord import RecordWriter

    with pytest.raises(KeyboardInterrupt, match="stopped by a signal"):
        _finished(tmp_path, 130, "fedcore simulate")  # Ctrl-C: the record is closed, resumable
    with pytest.raises(KeyboardInterrupt):
        _finished(tmp_path, 143, "fedcore simulate")
    with pytest.raises(FedcoreError, match="failed before its first round"):
        _finished(tmp_path / "none", 1, "fedcore simulate")
    RecordWriter(tmp_path / "failed", fedcore.Settings()).finish(status="failed", reason="boom")
    record = _finished(tmp_path / "failed", 1, "fedcore simulate")
    assert (record.status, record.reason, record.final_accuracy) == ("failed", "boom", None)


def test_the_runs_processes_get_this_import_path_and_it_is_restored(monkeypatch):
    from fedcore.api.runs import _import_path_for_children

    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    with _import_path_for_children():
        paths = os.environ["PYTHONPATH"].split(os.pathsep)
        assert str(ROOT) in paths and paths[-1] == "/elsewhere"
    assert os.environ["PYTHONPATH"] == "/elsewhere"
    monkeypatch.delenv("PYTHONPATH")
    with _import_path_for_children():
        assert "PYTHONPATH" in os.environ
    assert "PYTHONPATH" not in os.environ


def test_simulate_refuses_missing_data_before_the_engine_starts(tmp_path):
    start = time.monotonic()
    with pytest.raises(ConfigError, match="missing.npz"):
        fedcore.simulate(
            fedcore.settings(sites=2), data=tmp_path / "missing.npz", out=tmp_path / "r"
        )
    assert not (tmp_path / "r").exists()
    print(f"refused in {time.monotonic() - start:.1f} s")


@pytest.mark.parametrize(("jobs", "message"), [(0, "must be >= 1, got 0"), (2.5, "an integer")])
def test_run_experiment_refuses_bad_jobs_before_anything_runs(tmp_path, jobs, message):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ConfigError, match=message):
        fedcore.run_experiment(
            ROOT / "experiments" / "accuracy_vs_epsilon.toml", out=tmp_path / "x", jobs=jobs
        )
    assert not (tmp_path / "x").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the command's handler is put back
