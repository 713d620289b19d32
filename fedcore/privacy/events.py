"""Privacy events: frozen, nested records of what a mechanism released.

Theory of operation. An event describes a randomised release precisely enough for an accountant to
bound its privacy loss, and nothing more: no data, no seeds, no clock. The design follows
dp_accounting's ``dp_event.py`` (google/differential-privacy): leaf events name a mechanism and its
parameters, and two combinators nest them (composition of different events, self-composition of
one event ``count`` times). Unlike dp_accounting, each leaf also carries a ``count``, so the event a
DP-SGD round implies ("T steps of the Poisson-subsampled Gaussian") is one record, and charging an
event ``k`` times is *by construction* the same as charging it once with ``count * k``.

Every event is about one neighbouring relation: add or remove one unit (a record for a site's
ledger, a whole site for the federation's ledger). A ``noise_multiplier`` is always the standard
deviation of the Gaussian noise divided by the L2 sensitivity of the noised sum under that relation,
which for a sum of contributions clipped to norm ``C`` is ``C``.

Events in this module:

- :class:`GaussianEvent`: the Gaussian mechanism (Dwork and Roth 2014, Thm A.1; tight analysis by
  Balle and Wang 2018, Thm 8), self-composed ``count`` times.
- :class:`PoissonSubsampledGaussian`: each unit joins each step independently with probability
  ``sampling_rate`` (Abadi et al. 2016, DP-SGD; Mironov et al. 2019; Koskela et al. 2020 for PLD).
- :class:`FixedSizeSubsampledGaussian`: exactly ``sample_size`` of ``population_size`` units are
  drawn without replacement each step. No Poisson amplification is claimed; see the class.
- :class:`ComposedEvent`, :class:`SelfComposedEvent`: combinators.
- :class:`NoPrivacyLoss` (nothing about the data was released) and :class:`NonPrivate` (something
  was released without a DP guarantee: epsilon is infinite).

Extension point. A new mechanism is added in three places and nowhere else: a frozen dataclass
with a unique ``kind``, its entry in :data:`EVENT_TYPES` (so a ledger file can hold it), and a
lowering in :mod:`fedcore.privacy.accountant` (``_lower``) onto a mechanism the accountant can
compose; without one the accountant raises :class:`UnsupportedEventError`. A mechanism known only
by its Renyi-DP curve (distributed DP's distributed discrete Gaussian and Skellam,
:mod:`fedcore.privacy.distributed`) subclasses :class:`RdpEvent`: the accountant composes any
history holding one in RDP, and its module is named in :data:`_LAZY_KINDS` so that a ledger file
holding it loads without importing it first (it imports scipy).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from fedcore.errors import ConfigError, InvalidMessage


class UnsupportedEventError(ConfigError):
    """The accountant has no analysis for this event type; nothing was charged."""


def _check_count(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"an event's count must be an integer >= 1, got {count!r}")


def _check_noise(noise_multiplier: float) -> None:
    if not isinstance(noise_multiplier, int | float) or isinstance(noise_multiplier, bool):
        raise ConfigError(f"noise_multiplier must be a number, got {noise_multiplier!r}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ConfigError(
            f"noise_multiplier must be finite and > 0, got {noise_multiplier!r}"
            " (record a release without noise as NonPrivate())"
        )


@dataclass(frozen=True, slots=True)
class PrivacyEvent:
    """Base class of every event. Subclasses are frozen, slotted and hashable."""

    kind: ClassVar[str] = "abstract"


@dataclass(frozen=True, slots=True)
class NoPrivacyLoss(PrivacyEvent):
    """A step that released nothing about the data (clipping alone, a public computation)."""

    kind: ClassVar[str] = "no_privacy_loss"


@dataclass(frozen=True, slots=True)
class NonPrivate(PrivacyEvent):
    """A release without any DP guarantee. Any ledger holding it reports epsilon = inf."""

    kind: ClassVar[str] = "non_private"


@dataclass(frozen=True, slots=True)
class GaussianEvent(PrivacyEvent):
    """``count`` releases of a sum with sensitivity 1 plus N(0, noise_multiplier**2) noise each."""

    kind: ClassVar[str] = "gaussian"
    noise_multiplier: float
    count: int = 1

    def __post_init__(self) -> None:
        _check_noise(self.noise_multiplier)
        _check_count(self.count)


@dataclass(frozen=True, slots=True)
class PoissonSubsampledGaussian(PrivacyEvent):
    """``count`` steps; each unit is in a step's sample independently with ``sampling_rate``.

    Each step releases the sum over the sample (each contribution clipped to the sensitivity)
    plus Gaussian noise of ``noise_multiplier`` times the sensitivity. A ``sampling_rate`` of 1
    is the plain Gaussian mechanism.
    """

    kind: ClassVar[str] = "poisson_subsampled_gaussian"
    sampling_rate: float
    noise_multiplier: float
    count: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.sampling_rate, int | float) or not 0 < self.sampling_rate <= 1:
            raise ConfigError(f"sampling_rate must be in (0, 1], got {self.sampling_rate!r}")
        _check_noise(self.noise_multiplier)
        _check_count(self.count)


@dataclass(frozen=True, slots=True)
class FixedSizeSubsampledGaussian(PrivacyEvent):
    """``count`` steps, each on exactly ``sample_size`` of ``population_size`` units.

    ``noise_multiplier`` is the noise standard deviation over the bound ``C`` on one unit's
    contribution. With a fixed sample size, adding or removing a unit does not change how many
    units are drawn: in the natural coupling (Balle, Barthe and Gaboardi 2018, Sec. 5) the added
    unit takes the place of another, so the noised sum moves by up to ``2C``, not ``C``. By joint
    convexity of the hockey-stick divergence each step is then at least as private as the Gaussian
    mechanism with sensitivity ``2C``: the accountant charges
    ``GaussianEvent(noise_multiplier / 2)`` per step and claims no amplification from the
    sampling. This is an upper bound, correct for add/remove adjacency; Poisson amplification
    would not be.
    """

    kind: ClassVar[str] = "fixed_size_subsampled_gaussian"
    sample_size: int
    population_size: int
    noise_multiplier: float
    count: int = 1

    def __post_init__(self) -> None:
        for name in ("sample_size", "population_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.sample_size > self.population_size:
            raise ConfigError(
                f"sample_size {self.sample_size} exceeds population_size {self.population_size}"
            )
        _check_noise(self.noise_multiplier)
        _check_count(self.count)


@dataclass(frozen=True, slots=True)
class RevealedWithProbability(PrivacyEvent):
    """A step that, with ``probability`` (independent of the data), may reveal anything about the
    unit, and otherwise is dominated by the other events of its step.

    Used for a round that may be skipped for a reason that depends on the secret sample
    (:mod:`fedcore.privacy.skips`). Accounted exactly as a failure probability: if every step ``i``
    is, with probability ``1 - p_i``, dominated by its other events, then ``T`` steps composed
    satisfy ``delta(eps) <= delta_rest(eps) + 1 - prod_i (1 - p_i)`` (decompose each step's output
    distributions into the good and the bad part, which have the same data-independent weight in
    both neighbouring worlds, and compose the good parts), so the accountant computes the rest at
    ``delta - (1 - prod_i (1 - p_i))`` and reports infinity when nothing is left of ``delta``.
    """

    kind: ClassVar[str] = "revealed_with_probability"
    probability: float
    count: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.probability, int | float) or not 0 <= self.probability < 1:
            raise ConfigError(f"probability must be in [0, 1), got {self.probability!r}")
        _check_count(self.count)


@dataclass(frozen=True, slots=True)
class SelfComposedEvent(PrivacyEvent):
    """``event`` run ``count`` times in sequence (adaptively)."""

    kind: ClassVar[str] = "self_composed"
    event: PrivacyEvent
    count: int

    def __post_init__(self) -> None:
        if not isinstance(self.event, PrivacyEvent):
            raise ConfigError(f"SelfComposedEvent needs a PrivacyEvent, got {self.event!r}")
        _check_count(self.count)


@dataclass(frozen=True, slots=True)
class ComposedEvent(PrivacyEvent):
    """The events in ``events`` run in sequence (adaptively), each on the same data."""

    kind: ClassVar[str] = "composed"
    events: tuple[PrivacyEvent, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.events, tuple) or not all(
            isinstance(e, PrivacyEvent) for e in self.events
        ):
            raise ConfigError(f"ComposedEvent needs a tuple of PrivacyEvents, got {self.events!r}")


@dataclass(frozen=True, slots=True)
class RdpEvent(PrivacyEvent):
    """An event known by its Renyi-DP curve: ``rdp_curve(orders)`` is the RDP of all its
    ``count`` repetitions at each order (a numpy array); ``integer_orders`` says whether its bound
    holds at integer orders only. The accountant composes a history holding one in RDP."""

    integer_orders: ClassVar[bool] = False

    def rdp_curve(self, orders: tuple[float, ...]) -> Any:
        raise UnsupportedEventError(f"{type(self).__name__} gives no RDP curve")


# kind -> the module that defines it and lists it in its ``EVENTS`` (imported on first need)
_LAZY_KINDS: dict[str, str] = {
    "distributed_discrete_gaussian": "fedcore.privacy.distributed",
    "skellam": "fedcore.privacy.distributed",
    "poisson_subsampled_rdp": "fedcore.privacy.subsampled_rdp",
}


def _event_class(kind: object) -> type[PrivacyEvent] | None:
    if not isinstance(kind, str):
        return None
    if kind in EVENT_TYPES:
        return EVENT_TYPES[kind]
    if kind in _LAZY_KINDS:
        module: Any = importlib.import_module(_LAZY_KINDS[kind])
        return module.EVENTS.get(kind)
    return None


LEAF_TYPES: tuple[type[PrivacyEvent], ...] = (
    NoPrivacyLoss,
    NonPrivate,
    GaussianEvent,
    PoissonSubsampledGaussian,
    FixedSizeSubsampledGaussian,
    RevealedWithProbability,
)
_ALL_TYPES: tuple[type[PrivacyEvent], ...] = (*LEAF_TYPES, SelfComposedEvent, ComposedEvent)
EVENT_TYPES: dict[str, type[PrivacyEvent]] = {cls.kind: cls for cls in _ALL_TYPES}


# --- JSON codec -----------------------------------------------------------------------------------


def event_to_json(event: PrivacyEvent) -> dict[str, Any]:
    """A JSON-ready dict for ``event``; floats keep their exact value (``repr`` round-trips)."""
    if isinstance(event, SelfComposedEvent):
        return {"kind": event.kind, "event": event_to_json(event.event), "count": event.count}
    if isinstance(event, ComposedEvent):
        return {"kind": event.kind, "events": [event_to_json(e) for e in event.events]}
    if type(event) not in LEAF_TYPES and _event_class(event.kind) is not type(event):
        raise UnsupportedEventError(f"no JSON encoding for event type {type(event).__name__}")
    out: dict[str, Any] = {"kind": event.kind}
    for field in dataclasses.fields(event):
        value = getattr(event, field.name)  # a nested event (a wrapper's base) is encoded too
        out[field.name] = event_to_json(value) if isinstance(value, PrivacyEvent) else value
    return out


def event_from_json(obj: object) -> PrivacyEvent:
    """Rebuild an event from :func:`event_to_json` output.

    Raises :class:`InvalidMessage` for anything that is not a well-formed event (unknown kind,
    missing or extra fields, values out of range); never a bare ``KeyError`` or ``TypeError``.
    """
    if not isinstance(obj, Mapping):
        raise InvalidMessage(f"expected an event object, got {type(obj).__name__}")
    kind = obj.get("kind")
    cls = _event_class(kind)
    if cls is None:
        known = sorted({*EVENT_TYPES, *_LAZY_KINDS})
        raise InvalidMessage(f"unknown event kind {kind!r}; known: {known}")
    fields = dict(obj)
    del fields["kind"]
    expected = {field.name for field in dataclasses.fields(cls)}
    if set(fields) != expected:
        raise InvalidMessage(
            f"event {kind!r} has fields {sorted(fields)}, expected {sorted(expected)}"
        )
    try:
        if cls is SelfComposedEvent:
            return SelfComposedEvent(event=event_from_json(fields["event"]), count=fields["count"])
        if cls is ComposedEvent:
            inner = fields["events"]
            if not isinstance(inner, list):
                raise InvalidMessage(f"composed event needs a list of events, got {inner!r}")
            return ComposedEvent(events=tuple(event_from_json(e) for e in inner))
        for name in getattr(cls, "event_fields", ()):  # fields holding a nested event
            fields[name] = event_from_json(fields[name])
        return cls(**fields)
    except (ConfigError, KeyError, TypeError) as exc:
        raise InvalidMessage(f"bad event {dict(obj)!r}: {exc}") from exc
