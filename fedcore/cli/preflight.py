"""Everything that can be known before Ray (or a deployment) starts, checked before it starts.

Each check raises :class:`~fedcore.errors.ConfigError` with one line; the command then exits with
status 2 and leaves no run record behind (the out folder, probed first by the commands, is removed
again if the probe created it and a later check refuses the run).

Cheap checks come first, so a refusal costs what finding it costs (seconds, not the data and the
privacy accountant): the secure-aggregation threshold (no import), the GPU (torch), the model's
import (without data), then the data and the model built, then DP, where a quick lower bound on a
round's cost refuses before the accountant's exact figure is computed.

- the data loads for the server and every site, and the model builds (the working directory on the
  import path, as for ``python -m``, so ``model = "mymodels:Net"`` next to the user's files works);
- a GPU exists when ``client_gpus > 0`` (``device = "cuda"`` is checked with the settings);
- secure aggregation's threshold is not above the number of sites a round samples;
- with DP on, the budget affords at least one round (DP-FedAvg at the server, DP-SGD at each site);
- the out folder can be created and written;
- the Flower app declares every setting in its ``[tool.flwr.app.config]`` (Flower refuses a run
  config key it lacks, in the simulation only after the ServerApp has started).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from fedcore import config as cfg
from fedcore.errors import ConfigError
from fedcore.protections import RecordLevel, protections_of


def import_path_has_cwd() -> None:
    """Put the working directory first on ``sys.path`` (``python -m`` does; an installed script
    does not)."""
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def data_and_model(settings: cfg.Settings) -> tuple[tuple[int, ...], int, int, list[int]]:
    """Load the data and build the model once; returns ``(input_shape, num_classes, number of
    model parameters, site sizes)``."""
    from fedcore.data import load_holdout, load_site
    from fedcore.federation.site.data import data_settings
    from fedcore.models import build_model

    import_path_has_cwd()
    data = data_settings(settings)
    _, input_shape, num_classes = load_holdout(data)
    model = build_model(settings.model, input_shape=input_shape, num_classes=num_classes)
    dim = sum(int(v.numel()) for v in model.state_dict().values())
    sizes = [len(load_site(data, site_id).train.y) for site_id in range(settings.sites)]
    return input_shape, num_classes, dim, sizes


def model_importable(settings: cfg.Settings) -> None:
    """The model's name resolves (a user's ``module:callable`` imports) before any data loads."""
    from fedcore.models import model_factory

    import_path_has_cwd()
    model_factory(settings.model)


def cpu_warning(settings: cfg.Settings, *, cores: int) -> str | None:
    """A warning when ``client_cpus`` asks for more CPUs than this machine has (on a cluster of
    its own; a ``ray_address`` cluster counts its own CPUs); None otherwise.

    A warning, not a refusal: such a run is correct and its results the same, only slower (Ray
    runs one site at a time, each with ``client_cpus`` torch threads on fewer cores), and an
    operator may mean to oversubscribe; so it is said once, before the run starts, with the
    number of cores and the value to use (``fedcore experiment`` says it on its console, since a
    point's own output goes to its log)."""
    if settings.ray_address or settings.client_cpus <= cores:
        return None
    return (
        f"fedcore: warning: client_cpus={settings.client_cpus:g} is more than the {cores} CPU "
        f"cores of this machine: the sites train one at a time, each with "
        f"{int(settings.client_cpus)} torch threads on {cores} cores (slower); "
        f"--set client_cpus={cores} or less"
    )


def gpus(settings: cfg.Settings) -> None:
    if settings.client_gpus > 0:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            raise ConfigError(
                f"setting 'client_gpus' is {settings.client_gpus:g}, but no GPU is visible here "
                "(set client_gpus=0 to train on CPUs)"
            )


def sites_per_round(settings: cfg.Settings) -> int:
    """How many sites a round asks to train (Flower's sampler: the fraction, rounded down, >= 1)."""
    return max(1, int(settings.sites * settings.fraction_train))


def secagg_threshold(settings: cfg.Settings) -> None:
    if not settings.secagg.enabled or settings.secagg.threshold is None:
        return
    sampled = sites_per_round(settings)
    if settings.secagg.threshold > sampled:
        raise ConfigError(
            f"setting 'secagg.threshold' is {settings.secagg.threshold}, more than the {sampled} "
            f"sites a round samples (sites={settings.sites}, fraction_train={settings.fraction_train:g}): "
            "no round could ever be unmasked"
        )


def dp_affords_one_round(settings: cfg.Settings, *, dim: int, site_sizes: list[int]) -> None:
    """With DP on, one round must fit in what is left of each budget (nothing is charged): the
    federation's (:meth:`~fedcore.mechanisms.SiteLevelDP.check_before_run`, which also refuses a
    secure-aggregation ring too small for the DP encoding) and every site's
    (:func:`~fedcore.federation.site.folders.check_site_round`, once per distinct site size)."""
    from fedcore.federation.site.folders import check_site_round

    protections = protections_of(settings)
    if protections.mechanism is not None:
        protections.mechanism.check_before_run(dim=dim)
    if protections.record is None:
        return
    first_of_size: dict[int, int] = {}
    for site_id, size in enumerate(site_sizes):
        first_of_size.setdefault(size, site_id)
    # Every size's quick lower bound first (refusing only), then the accountant's exact cost.
    for exact in (False, True):
        for size, site_id in sorted(first_of_size.items()):
            try:
                check_site_round(settings, num_examples=size, site_id=site_id, exact=exact)
            except ConfigError as exc:
                if not protections.record.calibrated:
                    raise  # it names dp.site.epsilon and the round's cost already
                raise ConfigError(
                    unreachable_budget(protections.record, num_examples=size, site_id=site_id)
                    + f" (the calibration: {exc})"
                ) from exc


def unreachable_budget(record: RecordLevel, *, num_examples: int, site_id: int) -> str:
    """Why a calibrated ``dp.site.epsilon`` cannot be met at a site of ``num_examples`` records:
    what one round, and the planned rounds, cost even at the largest noise multiplier the
    calibration tries, and a budget that it can meet (tried, doubling from that cost).

    A budget far below one round's cost (``dp.site.epsilon=0.001``) fails inside the noise
    calibration (:func:`~fedcore.privacy.accountant.calibrate_noise_multiplier`), whose own
    message names neither the setting nor a cost; this is the message the operator gets instead.
    """
    import dataclasses

    from fedcore.privacy import PrivacyLedger, epsilon
    from fedcore.privacy.accountant import _Z_MAX as LARGEST_NOISE
    from fedcore.privacy.accountant import calibrate_noise_multiplier
    from fedcore.privacy.dpsgd_plan import plan_round

    rounds = record.planned_rounds
    config = dataclasses.replace(record.dp_config(), noise_multiplier=LARGEST_NOISE)
    ledger = PrivacyLedger(
        scope=record.scope(site_id), budget=record.budget(), accountant=record.accountant
    )
    plan = plan_round(config, num_examples=num_examples, ledger=ledger)
    one = epsilon([plan.event], delta=record.delta, accountant=record.accountant)
    run_event = dataclasses.replace(plan.event, count=plan.steps * rounds)
    whole = epsilon([run_event], delta=record.delta, accountant=record.accountant)
    text = (
        f"dp.site.epsilon={record.epsilon:g} cannot be met by {rounds_of(rounds)} at site "
        f"{site_id}: even at noise multiplier {LARGEST_NOISE:g} (the largest the calibration "
        f"tries) one round ({counted_steps(plan.steps)} at sampling rate "
        f"{plan.sample_rate:.4g}) costs epsilon {one:.3g}, and {rounds_of(rounds)} {whole:.3g}"
    )
    for doubling in range(8):
        candidate = float(f"{max(whole, record.epsilon) * 2**doubling:.2g}")
        try:
            calibrate_noise_multiplier(
                target_epsilon=candidate,
                delta=record.delta,
                sample_rate=plan.sample_rate,
                steps=plan.steps * rounds,
                accountant=record.accountant,
            )
        except ConfigError:
            continue
        return f"{text}; dp.site.epsilon={candidate:g} can be met, or plan fewer rounds"
    return f"{text}; raise dp.site.epsilon or plan fewer rounds"


def rounds_of(n: int) -> str:
    return f"{n} round" if n == 1 else f"the {n} planned rounds"


def counted_steps(n: int) -> str:
    return f"{n} DP-SGD step" if n == 1 else f"{n} DP-SGD steps"


@contextlib.contextmanager
def out_folder(out_dir: Path, *, existing_ok: bool = False) -> Iterator[Path]:
    """Create ``out_dir`` (and its parents) and probe that a file can be written there; inside the
    block, a ``ConfigError`` (or any exception) removes what this created. Raises
    :class:`ConfigError` for a folder under a file, a read-only place, or an existing record."""
    if not existing_ok and (out_dir / "history.jsonl").exists():
        raise ConfigError(
            f"output directory {str(out_dir)!r} already holds a run record "
            "(`fedcore simulate --resume DIR` continues it)"
        )
    created = _first_missing(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".fedcore-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        _remove(created)
        raise ConfigError(
            f"output directory {str(out_dir)!r} cannot be written: {exc.strerror or exc}"
        ) from exc
    try:
        yield out_dir
    except BaseException:
        _remove(created)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what mkdir -p would create)."""
    missing = None
    for folder in [path.resolve(), *path.resolve().parents]:
        if folder.exists() or folder.is_symlink():
            break
        missing = folder
    return missing


def _remove(created: Path | None) -> None:
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)


def app_declares_settings(settings: cfg.Settings, app_dir: Path | None = None) -> None:
    """The Flower app the run loads declares every key of the run config fedcore gives it
    (:meth:`~fedcore.config.Settings.to_run_config`) in its ``[tool.flwr.app.config]``. Flower
    refuses a run config key the app lacks ("Key ... is not present in the main dictionary"): in
    the simulation only once the ServerApp has started, as its ClientApps start, and the run then
    waited for their replies until every round timed out. ``app_dir``: default the app
    :func:`~fedcore.federation.simulation.engine.find_app_dir` finds; the app installed with
    fedcore makes its config from :class:`~fedcore.config.Settings` and is not read. Raises
    :class:`ConfigError` naming the keys and the file."""
    import tomllib

    from fedcore._schema import flatten_mapping  # as Flower flattens the tables: dotted keys
    from fedcore.federation.simulation.engine import declared_app_dir

    folder = app_dir or declared_app_dir()
    if folder is None:
        return
    pyproject = folder / "pyproject.toml"
    try:
        doc = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the Flower app's {str(pyproject)!r}: {exc}") from None
    table = doc.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    declared = flatten_mapping(table)
    missing = [key for key in settings.to_run_config() if key not in declared]
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ConfigError(
            f"the Flower app's {str(pyproject)!r} does not declare {len(missing)} fedcore "
            f"setting(s) in [tool.flwr.app.config] ({shown}): Flower would refuse the run "
            "config; add them with their defaults (`fedcore simulate --help-settings`), or set "
            "FEDCORE_APP_DIR to the app of this fedcore"
        )


def check(settings: cfg.Settings) -> tuple[tuple[int, ...], int]:
    """Every check but the out folder, cheapest first; returns ``(input_shape, num_classes)``.
    The protections' cross-checks come first (:meth:`fedcore.protections.Protections.check`)."""
    protections_of(settings)
    app_declares_settings(settings)
    secagg_threshold(settings)
    gpus(settings)
    model_importable(settings)
    input_shape, num_classes, dim, sizes = data_and_model(settings)
    dp_affords_one_round(settings, dim=dim, site_sizes=sizes)
    return input_shape, num_classes


def check_run(settings: cfg.Settings, out_dir: Path) -> tuple[tuple[int, ...], int]:
    """What a command checks before it starts anything: the out folder first (it costs nothing,
    so a bad ``--out`` is refused at once), then :func:`check`, inside the folder's block so that a
    refusal removes what the probe created. A resumed record's ``status.json`` is removed once the
    checks pass (how the last attempt ended is no longer true). Returns ``(input_shape,
    num_classes)``; raises :class:`ConfigError`."""
    with out_folder(out_dir, existing_ok=settings.resume):
        shapes = check(settings)
        if settings.resume:
            (out_dir / "status.json").unlink(missing_ok=True)
    return shapes
