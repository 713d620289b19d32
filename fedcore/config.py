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

import difflib
import functools
import json
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedcore._schema import (
    Scalar,
    SettingSpec,
    build,
    check_bounds,
    coerce,
    flatten,
    flatten_mapping,
    specs,
)
from fedcore.errors import ConfigError

Partition = Literal["iid", "dirichlet", "pathological"]
StrategyName = Literal[
    "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian"
]
# Strategies that need every site's individual update (refused under secure aggregation), and
# the linear rest (a weighted mean of the replies, then perhaps a server optimizer step).
NONLINEAR_STRATEGIES = ("fedmedian",)
LINEAR_STRATEGIES = tuple(s for s in typing.get_args(StrategyName) if s not in NONLINEAR_STRATEGIES)
Device = Literal["auto", "cpu", "cuda"]
Clipping = Literal["fixed", "adaptive"]
Accountant = Literal["pld", "rdp"]
SecAggMode = Literal["semi-honest", "active"]
BudgetAgainst = Literal["observers", "sample-known"]


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
class DistributedDPSettings:
    """Distributed DP under secure aggregation: each site adds discrete noise before masking (on
    when ``epsilon`` is set; needs ``secagg.enabled``). ``colluders`` -1 means the protocol's
    corruption bound: ``t - 1`` for the safe threshold ``t`` of each round's sites, graph and mode
    (:func:`fedcore.secagg.floors.safe_threshold`)."""

    epsilon: float | None = field(
        default=None,
        metadata=_doc("each site's budget against the server (distributed DP); unset: off", gt=0),
    )
    delta: float = field(default=1e-5, metadata=_doc("distributed DP's delta", gt=0, lt=1))
    mechanism: Literal["dgauss", "skellam"] = field(
        default="dgauss", metadata=_doc("the sites' discrete noise: dgauss or skellam")
    )
    bits: int = field(
        default=20,
        metadata=_doc("bits of the ring under distributed DP (not secagg.bits)", min=8, le=62),
    )
    clip_norm: float = field(default=1.0, metadata=_doc("L2 bound on each site's update", gt=0))
    dropout_tolerance: float = field(
        default=0.1, metadata=_doc("fraction of sampled sites that may drop out", ge=0, lt=1)
    )
    colluders: int = field(
        default=-1,
        metadata=_doc("sites assumed to add no noise; -1: the protocol's bound t - 1", min=-1),
    )


@dataclass(frozen=True, slots=True)
class DPSettings:
    site: SiteDPSettings = field(default_factory=SiteDPSettings)
    server: ServerDPSettings = field(default_factory=ServerDPSettings)
    distributed: DistributedDPSettings = field(default_factory=DistributedDPSettings)
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
        default=120.0,
        metadata=_doc(
            "seconds one site has for each protocol stage (in simulation, times the sites a "
            "worker answers in turn)",
            gt=0,
        ),
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
            "0: ceil(sites / workers); 1: one node per site (secure aggregation too: issue 24)",
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
    seed: int = field(
        default=0,
        metadata=_doc(
            "seed for data, partitioning, initial model; DP noise is drawn from a CSPRNG: runs "
            "differ at a fixed seed (DP-SGD's Poisson batches too)"
        ),
    )
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
        return dict(flatten(self))

    def to_run_config(self) -> dict[str, Scalar]:
        """The settings as Flower's run config: scalars only, an unset optional as ``""``."""
        return {k: ("" if v is None else v) for k, v in flatten(self)}


# --------------------------------------------------------------------------------------------
# Schema introspection
# --------------------------------------------------------------------------------------------


SPECS: dict[str, SettingSpec] = {s.key: s for s in specs(Settings)}


# --------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, SPECS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"unknown setting {key!r}{hint}; `fedcore simulate --help-settings` lists them"
    )


def _cross_check(settings: Settings) -> None:
    """Rules between fields of the schema. Rules between protections (secure aggregation's
    strategies and thresholds, DP-SGD with fedprox) are :meth:`fedcore.protections.Protections.check`."""
    for group in ("site", "server"):
        dp = getattr(settings.dp, group)
        if dp.noise_multiplier is not None and dp.epsilon is None:
            raise ConfigError(
                f"setting 'dp.{group}.noise_multiplier' is {dp.noise_multiplier:g} but "
                f"'dp.{group}.epsilon' is unset, so DP would be off and the noise ignored; "
                f"set 'dp.{group}.epsilon' (the budget the run may spend) or drop the noise multiplier"
            )
    neighbors = settings.secagg.neighbors
    if neighbors != "complete" and not (
        neighbors.isdigit() and int(neighbors) >= 2 and int(neighbors) % 2 == 0
    ):
        raise ConfigError(
            "setting 'secagg.neighbors' must be 'complete' or an even integer >= 2 "
            f"(the degree of a Harary graph), got {neighbors!r}"
        )
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
    settings = build(Settings, merged)
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
    coerced = coerce(spec, value, from_text=from_text)
    check_bounds(spec, coerced)
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
