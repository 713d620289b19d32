"""Settings of a federation: one schema, read from defaults, a TOML file and ``--set key=value``.

The schema is the frozen dataclass :class:`Settings` (with nested groups). Each field is one
setting; a nested group's fields get dotted keys (``synthetic.samples``). The same keys are valid in
a TOML file (``[synthetic] samples = 500`` or ``"synthetic.samples" = 500``), after ``--set``, and in
Flower's run config, which is how the ServerApp and every ClientApp receive them.

Flower's run config holds only scalars, so an unset optional value travels as the empty string.
``pyproject.toml``'s ``[tool.flwr.app.config]`` must list every key with its default, because Flower
refuses override keys it does not know; ``tests/test_config.py`` checks that the two agree.

Every failure is a :class:`~fedcore.errors.ConfigError` whose message names the key and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedcore.errors import ConfigError

Partition = Literal["iid", "dirichlet", "pathological"]
StrategyName = Literal[
    "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian"
]
# Strategies that need every site's individual update (refused under secure aggregation).
NONLINEAR_STRATEGIES = ("fedmedian",)
Device = Literal["auto", "cpu", "cuda"]
Clipping = Literal["fixed", "adaptive"]
Accountant = Literal["pld", "rdp"]
SecAggMode = Literal["semi-honest", "active"]
BudgetAgainst = Literal["observers", "sample-known"]

Scalar = bool | int | float | str


def _doc(text: str, **meta: Any) -> dict[str, Any]:
    return {"help": text, **meta}


@dataclass(frozen=True, slots=True)
class SyntheticSettings:
    """The seeded synthetic dataset (``dataset = "synthetic"``)."""

    samples: int = field(default=2000, metadata=_doc("number of samples", min=1))
    features: int = field(default=20, metadata=_doc("number of features", min=1))
    classes: int = field(default=4, metadata=_doc("number of classes", min=2))


@dataclass(frozen=True, slots=True)
class SiteDPSettings:
    """Record-level DP-SGD at each site (on when ``epsilon`` is set)."""

    epsilon: float | None = field(
        default=None, metadata=_doc("each site's record-level budget; unset: no DP-SGD", gt=0)
    )
    delta: float = field(default=1e-5, metadata=_doc("each site's delta", gt=0, lt=1))
    noise_multiplier: float | None = field(
        default=None,
        metadata=_doc(
            "DP-SGD noise multiplier; unset: calibrated from the budget over all rounds", gt=0
        ),
    )
    max_grad_norm: float = field(
        default=1.0, metadata=_doc("per-example gradient clipping norm", gt=0)
    )


@dataclass(frozen=True, slots=True)
class ServerDPSettings:
    """Site-level DP at a trusted server, DP-FedAvg (on when ``epsilon`` is set)."""

    epsilon: float | None = field(
        default=None, metadata=_doc("the federation's site-level budget; unset: off", gt=0)
    )
    delta: float = field(default=1e-5, metadata=_doc("the federation's delta", gt=0, lt=1))
    noise_multiplier: float | None = field(
        default=None,
        metadata=_doc(
            "noise on the sum, in units of clip_norm; unset: calibrated over all rounds", gt=0
        ),
    )
    clip_norm: float = field(
        default=1.0, metadata=_doc("L2 bound on each site's update (initial, if adaptive)", gt=0)
    )
    clipping: Clipping = field(
        default="fixed", metadata=_doc("fixed, or adaptive (Andrew et al. 2021)")
    )
    budget_against: BudgetAgainst = field(
        default="observers",
        metadata=_doc(
            "which epsilon the budget binds: observers (who do not know the sample) or "
            "sample-known (who know which sites took part)"
        ),
    )
    state_dir: str = field(
        default="",
        metadata=_doc("folder of the federation ledger, kept across runs; empty: the run record"),
    )


@dataclass(frozen=True, slots=True)
class DPSettings:
    site: SiteDPSettings = field(default_factory=SiteDPSettings)
    server: ServerDPSettings = field(default_factory=ServerDPSettings)
    accountant: Accountant = field(
        default="pld", metadata=_doc("privacy accountant of every ledger")
    )


@dataclass(frozen=True, slots=True)
class SecAggSettings:
    """Secure aggregation inside the federation (issue 5)."""

    enabled: bool = field(
        default=False, metadata=_doc("mask updates so the server learns only their sum")
    )
    neighbors: str = field(
        default="complete", metadata=_doc("complete, or an integer k (SecAgg+ k-regular graph)")
    )
    threshold: int | None = field(
        default=None, metadata=_doc("survivors needed to unmask; unset: a safe default", min=2)
    )
    bits: int = field(default=32, metadata=_doc("bits of the ring Z_(2^bits)", min=8, le=62))
    clip_range: float = field(
        default=4.0, metadata=_doc("updates are clipped to [-r, r] before encoding", gt=0)
    )
    timeout: float = field(
        default=120.0, metadata=_doc("seconds each protocol stage waits for sites", gt=0)
    )
    mode: SecAggMode = field(
        default="semi-honest",
        metadata=_doc("semi-honest, or active (signed adverts, consistency check)"),
    )
    allow_unsafe: bool = field(
        default=False,
        metadata=_doc(
            "accept a threshold or graph below the protocol's safe rules (experiments only; "
            "deployed sites still enforce their own floors)"
        ),
    )


@dataclass(frozen=True, slots=True)
class SimulationSettings:
    """How ``fedcore simulate`` maps sites onto Flower's simulation engine (issue 13)."""

    sites_per_node: int = field(
        default=0,
        metadata=_doc(
            "sites one simulated Flower node plays in turn, one message per node per round; "
            "0: ceil(sites / workers); 1: one node per site (always so under secure aggregation)",
            min=0,
        ),
    )


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of ``fedcore simulate``; defaults are the main job (digits over 10 sites)."""

    sites: int = field(default=10, metadata=_doc("number of data-center sites", min=1))
    rounds: int = field(default=20, metadata=_doc("federated rounds", min=1))
    dataset: str = field(
        default="digits",
        metadata=_doc(
            "digits | synthetic | a local .npz/.csv/.parquet/saved HF dataset | hf:<hub name>"
        ),
    )
    partition: Partition = field(default="iid", metadata=_doc("how data is split across sites"))
    alpha: float = field(
        default=0.5, metadata=_doc("Dirichlet concentration (partition=dirichlet)", gt=0)
    )
    classes_per_site: int = field(
        default=2, metadata=_doc("classes per site (partition=pathological)", min=1)
    )
    label_column: str = field(default="label", metadata=_doc("label column of CSV/Parquet/HF data"))
    model: str = field(default="mlp", metadata=_doc("mlp | cnn | package.module:callable"))
    local_epochs: int = field(default=5, metadata=_doc("local epochs per round", min=1))
    batch_size: int = field(default=16, metadata=_doc("local batch size", min=1))
    lr: float = field(default=0.2, metadata=_doc("local learning rate (SGD)", gt=0))
    strategy: StrategyName = field(default="fedavg", metadata=_doc("server strategy"))
    server_lr: float | None = field(
        default=None,
        metadata=_doc(
            "server learning rate (fedavgm, fedadam, fedyogi, fedadagrad); unset: Flower's "
            "default for the strategy (fedavgm 1.0, fedadam 0.1, fedyogi 0.01, fedadagrad 0.1)",
            gt=0,
        ),
    )
    server_momentum: float = field(
        default=0.9, metadata=_doc("server momentum (fedavgm)", ge=0, lt=1)
    )
    proximal_mu: float = field(default=0.01, metadata=_doc("proximal term (fedprox)", ge=0))
    fraction_train: float = field(
        default=1.0, metadata=_doc("fraction of sites sampled per round", gt=0, le=1)
    )
    round_timeout: float = field(
        default=600.0, metadata=_doc("seconds to wait for sites' replies in each exchange", gt=0)
    )
    max_failed_rounds: int = field(
        default=3,
        metadata=_doc(
            "stop the run as failed after this many rounds in a row in which every site failed",
            min=1,
        ),
    )
    seed: int = field(default=0, metadata=_doc("seed for data, partitioning, initial model"))
    device: Device = field(
        default="auto", metadata=_doc("training device: auto uses CUDA when present")
    )
    client_cpus: float = field(
        default=1.0, metadata=_doc("CPUs reserved per site in simulation", gt=0)
    )
    client_gpus: float = field(
        default=0.0,
        metadata=_doc("GPU share per site in simulation (0.5 = two sites per GPU)", ge=0),
    )
    ray_address: str = field(
        default="",
        metadata=_doc(
            "address of an existing Ray cluster to simulate on (host:port); empty: start Ray here"
        ),
    )
    test_fraction: float = field(default=0.2, metadata=_doc("per-site test split", gt=0, lt=1))
    holdout_fraction: float = field(
        default=0.2,
        metadata=_doc("share of the data kept by the server for central evaluation", gt=0, lt=1),
    )
    out: str = field(default="", metadata=_doc("run record directory; empty: runs/<timestamp>"))
    resume: bool = field(
        default=False,
        metadata=_doc("continue the run record in 'out' from its last completed round"),
    )
    synthetic: SyntheticSettings = field(default_factory=SyntheticSettings)
    dp: DPSettings = field(default_factory=DPSettings)
    secagg: SecAggSettings = field(default_factory=SecAggSettings)
    simulation: SimulationSettings = field(default_factory=SimulationSettings)

    def to_dict(self) -> dict[str, Scalar | None]:
        """Flat ``{dotted key: value}`` of every setting (``None`` for unset optionals)."""
        return dict(_flatten(self))

    def to_run_config(self) -> dict[str, Scalar]:
        """The settings as Flower's run config: scalars only, an unset optional as ``""``."""
        return {k: ("" if v is None else v) for k, v in _flatten(self)}


# --------------------------------------------------------------------------------------------
# Schema introspection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SettingSpec:
    """One key of the schema."""

    key: str
    type: Any
    default: Scalar | None
    help: str
    meta: Mapping[str, Any]

    @property
    def optional(self) -> bool:
        return _is_optional(self.type)

    @property
    def choices(self) -> tuple[str, ...] | None:
        base = _strip_optional(self.type)
        return tuple(typing.get_args(base)) if typing.get_origin(base) is Literal else None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_group(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    if _is_optional(tp):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner
    return tp


def _specs(cls: type, prefix: str = "") -> Iterable[SettingSpec]:
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_group(tp):
            yield from _specs(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        yield SettingSpec(f"{prefix}{f.name}", tp, default, f.metadata.get("help", ""), f.metadata)


SPECS: dict[str, SettingSpec] = {s.key: s for s in _specs(Settings)}


def _flatten(obj: Any, prefix: str = "") -> Iterable[tuple[str, Scalar | None]]:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _flatten(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


# --------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, SPECS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"unknown setting {key!r}{hint}; `fedcore simulate --help-settings` lists them"
    )


def _coerce(spec: SettingSpec, value: Any, *, from_text: bool) -> Scalar | None:
    """Convert ``value`` to the setting's type; text from ``--set`` is parsed, other input is not."""
    base = _strip_optional(spec.type)
    if spec.optional and (value is None or value == "" or (from_text and value.lower() == "none")):
        return None
    choices = spec.choices
    try:
        if choices is not None:
            if value not in choices:
                raise ValueError
            return str(value)
        if base is bool:
            if isinstance(value, bool):
                return value
            if from_text and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            if from_text:
                return int(value)
            raise ValueError
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if (from_text or isinstance(value, int | float)) else None
            if number is None or not math.isfinite(number):
                raise ValueError
            return number
        if base is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"setting {spec.key!r} has an unsupported type {spec.type!r}")
    names = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}
    expected = f"one of {', '.join(choices)}" if choices else names.get(base, str(base))
    raise ConfigError(f"setting {spec.key!r} must be {expected}, got {value!r}")


def _check_bounds(spec: SettingSpec, value: Scalar | None) -> None:
    if value is None or isinstance(value, str | bool):
        return
    meta = spec.meta
    for bound, ok in (
        ("min", lambda v, b: v >= b),
        ("ge", lambda v, b: v >= b),
        ("gt", lambda v, b: v > b),
        ("le", lambda v, b: v <= b),
        ("lt", lambda v, b: v < b),
    ):
        if bound in meta and not ok(value, meta[bound]):
            symbol = {"min": ">=", "ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[bound]
            raise ConfigError(f"setting {spec.key!r} must be {symbol} {meta[bound]}, got {value!r}")


def _build(cls: type, values: Mapping[str, Scalar | None], prefix: str = "") -> Any:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if _is_group(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values, f"{key}.")
        elif key in values:
            kwargs[f.name] = values[key]
    return cls(**kwargs)


def flatten_mapping(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (TOML tables become dotted keys)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten_mapping(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _cross_check(settings: Settings) -> None:
    if settings.secagg.enabled:
        if settings.sites < 2:
            raise ConfigError(
                f"secure aggregation needs at least 2 sites, got sites={settings.sites}"
            )
        if settings.strategy in NONLINEAR_STRATEGIES:
            raise ConfigError(
                f"strategy {settings.strategy!r} needs every site's individual update, which secure "
                "aggregation hides; use a linear strategy (fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad)"
            )
    for group in ("site", "server"):
        dp = getattr(settings.dp, group)
        if dp.noise_multiplier is not None and dp.epsilon is None:
            raise ConfigError(
                f"setting 'dp.{group}.noise_multiplier' is {dp.noise_multiplier:g} but "
                f"'dp.{group}.epsilon' is unset, so DP would be off and the noise ignored; "
                f"set 'dp.{group}.epsilon' (the budget the run may spend) or drop the noise multiplier"
            )
    if settings.dp.site.epsilon is not None and settings.strategy == "fedprox":
        raise ConfigError(
            "strategy 'fedprox' adds a proximal term that DP-SGD does not support; use fedavg or fedadam"
        )
    neighbors = settings.secagg.neighbors
    if neighbors != "complete" and not (
        neighbors.isdigit() and int(neighbors) >= 2 and int(neighbors) % 2 == 0
    ):
        raise ConfigError(
            "setting 'secagg.neighbors' must be 'complete' or an even integer >= 2 "
            f"(the degree of a Harary graph), got {neighbors!r}"
        )
    if settings.secagg.enabled and not settings.secagg.allow_unsafe:
        _check_secagg_safety(settings)
    if settings.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("setting 'device' is 'cuda', but no CUDA device is available here")
    if settings.partition == "pathological" and settings.dataset == "synthetic":
        if settings.classes_per_site > settings.synthetic.classes:
            raise ConfigError(
                f"setting 'classes_per_site' is {settings.classes_per_site}, more than the "
                f"{settings.synthetic.classes} classes of the synthetic dataset"
            )


def _check_secagg_safety(settings: Settings) -> None:
    """``secagg.threshold`` and ``secagg.neighbors`` against the protocol's safe rules for a round
    of all ``sites`` (:mod:`fedcore.secagg.floors`, the rules every site enforces by default)."""
    from fedcore.secagg.config import Mode
    from fedcore.secagg.floors import safe_threshold

    n = settings.sites
    k = 0 if settings.secagg.neighbors == "complete" else int(settings.secagg.neighbors)
    k = 0 if k >= n - 1 else k
    mode = Mode.ACTIVE if settings.secagg.mode == "active" else Mode.SEMI_HONEST
    try:
        floor = safe_threshold(n, neighbors=k, mode=mode)
    except ConfigError as exc:
        raise ConfigError(
            f"setting 'secagg.neighbors' is {settings.secagg.neighbors!r}: {exc} "
            "(set 'secagg.allow_unsafe=true' to run it anyway, for experiments)"
        ) from None
    threshold = settings.secagg.threshold
    if threshold is not None and threshold < floor:
        raise ConfigError(
            f"setting 'secagg.threshold' is {threshold}, below the safe {floor} for {n} sites "
            f"({'complete graph' if k == 0 else f'{k} neighbours'}, {settings.secagg.mode} mode); "
            "sites refuse such a round (set 'secagg.allow_unsafe=true' for experiments)"
        )


def resolve(
    *,
    file: str | Path | None = None,
    overrides: Iterable[str] = (),
    values: Mapping[str, Any] | None = None,
) -> Settings:
    """Defaults, then the TOML ``file``, then ``values``, then ``overrides`` (``"key=value"``).

    Raises :class:`ConfigError` for an unreadable file, an unknown key, a value of the wrong type
    or out of range, or a malformed override.
    """
    merged: dict[str, Scalar | None] = {}
    if file is not None:
        path = Path(file)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {str(path)!r} does not exist") from exc
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {str(path)!r} could not be read: {exc}") from exc
        for key, value in flatten_mapping(data).items():
            merged[key] = _checked(key, value, from_text=False)
    for key, value in (values or {}).items():
        merged[key] = _checked(key, value, from_text=False)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        merged[key.strip()] = _checked(key.strip(), text.strip(), from_text=True)
    settings = _build(Settings, merged)
    _cross_check(settings)
    return settings


def parse_overrides(items: Iterable[str]) -> dict[str, Scalar | None]:
    """``["key=value", ...]`` as typed ``{key: value}``, each checked alone (no cross-checks)."""
    parsed: dict[str, Scalar | None] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        parsed[key.strip()] = _checked(key.strip(), text.strip(), from_text=True)
    return parsed


def _checked(key: str, value: Any, *, from_text: bool) -> Scalar | None:
    spec = SPECS.get(key)
    if spec is None:
        raise _unknown_key(key)
    coerced = _coerce(spec, value, from_text=from_text)
    _check_bounds(spec, coerced)
    return coerced


def from_run_config(run_config: Mapping[str, Any]) -> Settings:
    # Every message a site handles carries the same run config: parse it once per process.
    return _from_run_config_items(
        tuple(sorted((k, v) for k, v in run_config.items() if k in SPECS))
    )


@functools.lru_cache(maxsize=64)
def _from_run_config_items(items: tuple[tuple[str, Any], ...]) -> Settings:
    return _parse_run_config(dict(items))


def _parse_run_config(run_config: Mapping[str, Any]) -> Settings:
    """Settings from a Flower run config (as written by :meth:`Settings.to_run_config`).

    Every fedcore key must be present: Flower fills the run config from the app's pyproject, so a
    missing key means the app was started without its config, and silently falling back to the
    defaults would train on the wrong data. Keys fedcore does not know are ignored (Flower may add
    its own); known keys are validated. Raises :class:`ConfigError`.
    """
    missing = [key for key in SPECS if key not in run_config]
    if missing:
        raise ConfigError(
            f"the run config lacks {len(missing)} fedcore setting(s) ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); was the app started without its pyproject config?"
        )
    return resolve(values={k: v for k, v in run_config.items() if k in SPECS})


def describe() -> str:
    """A table of every setting with its default, for ``--help-settings``."""
    lines = []
    for spec in SPECS.values():
        choices = f" ({'|'.join(spec.choices)})" if spec.choices else ""
        default = "unset" if spec.default is None else json.dumps(spec.default)
        lines.append(f"  {spec.key:<26} {default:<13} {spec.help}{choices}")
    return "\n".join(lines)
