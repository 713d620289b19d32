"""Runs from Python: a simulated federation, a loopback deployment, an experiment.

Each function runs what its ``fedcore`` command runs, through the function that does that
command's work, with the :class:`~fedcore.config.Settings` and paths as they are
(:func:`fedcore.cli.simulate.simulate`, :func:`fedcore.cli.deploy_local.deploy_local`,
:func:`fedcore.cli.experiment.experiment`; no option names, no settings turned into text), so the
checks before a run, the child processes, the handling of Ctrl-C and SIGTERM and the closing of
the record are the command's, not a copy of them. Call them from the main thread (they install
signal handlers while they run), in a script whose run is under ``if __name__ == "__main__":``
(a model defined in the script is imported again, by name, in the processes that train it).

Errors: a bad setting raises :class:`~fedcore.errors.ConfigError` before anything starts, naming
the setting and the value; a run stopped by Ctrl-C or SIGTERM raises ``KeyboardInterrupt`` once
its record is closed (``fedcore simulate --resume DIR`` continues it); a run that failed before its
first round, leaving no record, raises :class:`~fedcore.errors.FedcoreError`. A run that failed
later returns its record, whose ``status`` is ``failed``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcore.api._settings import override
from fedcore.api.record import RunRecord
from fedcore.config import Settings
from fedcore.errors import ConfigError, FedcoreError

if TYPE_CHECKING:
    from fedcore.experiment.results import RunResult

PathLike = str | os.PathLike[str]


def model_reference(model: str | Callable[..., Any]) -> str:
    """The ``package.module:callable`` name of ``model`` (a name is returned as given). A class or
    function defined in the script being run (``__main__``) is named by the script's file name.
    Raises :class:`ConfigError` for a callable that has no importable name (a lambda, a nested
    function, or one defined in an interactive session)."""
    if isinstance(model, str):
        return model
    module = getattr(model, "__module__", None)
    qualname = getattr(model, "__qualname__", "")
    if not module or not qualname or "." in qualname or "<" in qualname:
        raise ConfigError(
            f"model {model!r} has no importable name: give a module-level class or function"
        )
    if module == "__main__":
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        if main_file is None:
            raise ConfigError(
                f"model {qualname!r} is defined in an interactive session: the processes that "
                "train it cannot import it; define it in a .py file"
            )
        module = Path(main_file).stem
    return f"{module}:{qualname}"


@contextlib.contextmanager
def _import_path_for_children() -> Iterator[None]:
    """While inside, ``PYTHONPATH`` holds this process's import path, so a user model importable
    here (next to the script, in its folder) is importable in the run's processes too."""
    saved = os.environ.get("PYTHONPATH")
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None:
        paths.insert(0, str(Path(main_file).resolve().parent))
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [saved])])
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _prepared(
    settings: Settings | None, *, model: str | Callable[..., Any] | None, data: PathLike | None
) -> Settings:
    changes: dict[str, Any] = {}
    if model is not None:
        changes["model"] = model_reference(model)
    if data is not None:
        changes["dataset"] = str(Path(data).expanduser().resolve())
    return override(settings or Settings(), changes)


def _finished(out_dir: Path, code: int, command: str) -> RunRecord:
    from fedcore.lifecycle import stopped_by_signal

    if stopped_by_signal(code):
        raise KeyboardInterrupt(f"{command} stopped by a signal (exit {code}); record: {out_dir}")
    try:
        return RunRecord(out_dir)
    except ConfigError:
        raise FedcoreError(
            f"{command} failed before its first round (exit {code}); no run record kept"
        ) from None


def simulate(
    settings: Settings | None = None,
    *,
    out: PathLike | None = None,
    model: str | Callable[..., Any] | None = None,
    data: PathLike | None = None,
    verbose: bool = False,
) -> RunRecord:
    """Run a federation on Flower's simulation engine, as ``fedcore simulate`` does; its record.

    ``settings``: from :func:`fedcore.settings` (default: the main job, digits over 10 sites).
    ``out``: the record's folder (default: the ``out`` setting, else ``runs/<timestamp>``); it must
    not hold a record already. ``model``: your own model, a module-level class or function called
    with ``input_shape=`` and ``num_classes=`` that returns a ``torch.nn.Module`` (or its name,
    ``"package.module:callable"``). ``data``: your own data, a ``.npz`` file with arrays ``x`` and
    ``y`` (or ``.csv``, ``.parquet``, a saved Hugging Face dataset folder). ``verbose``: show
    Flower's and Ray's logs. Raises as the module says.
    """
    from fedcore.cli import out_dir_of
    from fedcore.cli.simulate import simulate as run

    settings = _prepared(settings, model=model, data=data)
    out_dir = out_dir_of(settings, out)
    with _import_path_for_children():
        code = run(settings, out_dir, verbose=verbose)
    return _finished(out_dir, code, "fedcore simulate")


def deploy_local(
    settings: Settings | None = None,
    *,
    out: PathLike | None = None,
    verbose: bool = False,
) -> RunRecord:
    """Run the app on Flower's deployment engine on 127.0.0.1, as ``fedcore deploy-local`` does:
    a SuperLink and ``settings.sites`` SuperNodes with TLS and node authentication, every process
    stopped at the end; the run's record. ``out`` as for :func:`simulate`. Raises as the module
    says."""
    from fedcore.cli import out_dir_of
    from fedcore.cli.deploy_local import deploy_local as run

    settings = _prepared(settings, model=None, data=None)  # checked, as fedcore.settings checks
    out_dir = out_dir_of(settings, out).expanduser().resolve()
    with _import_path_for_children():
        code = run(settings, out_dir, verbose=verbose)
    return _finished(out_dir, code, "fedcore deploy-local")


@dataclass(frozen=True, slots=True)
class ExperimentRecord:
    """An experiment's folder: ``results.csv``, ``summary.md``, the plots and one run record per
    point under ``runs/``. ``results`` holds one :class:`~fedcore.experiment.results.RunResult`
    per point (its swept values in ``result.point.swept``, ``final_accuracy``,
    ``record_epsilon``, ``server_epsilon``, ``status``, ``run_dir``)."""

    path: Path
    results: tuple[RunResult, ...]

    @property
    def complete(self) -> bool:
        """Whether every point's run completed every round."""
        return all(
            r.returncode == 0 and r.rounds_completed == r.rounds_planned for r in self.results
        )

    @property
    def summary(self) -> str:
        return (self.path / "summary.md").read_text()

    @property
    def plots(self) -> tuple[Path, ...]:
        return tuple(sorted(self.path.glob("*.png")))

    def run(self, result: RunResult) -> RunRecord:
        """The run record of one point."""
        return RunRecord(result.run_dir)


def run_experiment(
    spec: PathLike, *, out: PathLike | None = None, jobs: int = 1, quick: bool = False
) -> ExperimentRecord:
    """Run every point of an experiment spec (TOML), as ``fedcore experiment SPEC`` does: each
    point one simulated run in a subprocess, ``jobs`` at a time; a rerun with the same ``out``
    skips the points already finished. ``out`` default: ``runs/experiment-<name>`` (``-quick``
    with ``quick``, which applies the spec's ``[quick]`` table). Raises :class:`ConfigError` for a
    bad spec before anything runs, ``KeyboardInterrupt`` on Ctrl-C or SIGTERM (the points that a
    signal stopped run again on a rerun)."""
    from fedcore.cli.experiment import default_folder, experiment
    from fedcore.experiment import load_spec, plan
    from fedcore.experiment.results import collect

    parsed = load_spec(Path(spec), quick=quick)
    folder = Path(out) if out is not None else default_folder(parsed, quick=quick)
    experiment(Path(spec), out=folder, jobs=jobs, quick=quick)
    return ExperimentRecord(path=folder, results=tuple(collect(plan(parsed), out=folder)))
