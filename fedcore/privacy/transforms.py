"""Small pure privacy transforms on model updates, each reporting the privacy event it implies.

Theory of operation. An update is a sequence of numpy arrays (one per model tensor) treated as one
vector. The transforms compose like optax's gradient transformations (google-deepmind/optax,
``optax/transforms/_combining.py``): each takes a value and returns a :class:`Transformed` holding
the new value and the :class:`~fedcore.privacy.events.PrivacyEvent` that releasing it would imply
for one unit's contribution, *given the sensitivity the caller states*.

- :func:`clip_to_norm` bounds one contribution's L2 norm by ``C`` (Abadi et al. 2016, eq. in
  Alg. 1: ``x * min(1, C / ||x||)``); it releases nothing: :class:`NoPrivacyLoss`.
- :func:`add_gaussian_noise` adds Gaussian noise of standard deviation ``std``; for an L2
  sensitivity ``s`` it is the Gaussian mechanism with noise multiplier ``std / s``. The noise is
  the discrete Gaussian on a fine grid (:mod:`fedcore.privacy.noise`, Canonne, Kamath and Steinke
  2020), so the output's low-order bits do not leak the input (Mironov 2012).
- :func:`noisy_clipped_count` is the private quantile estimate of Andrew et al. (NeurIPS 2021,
  Alg. 1 and Sec. 3): the sum of ``b_i - 1/2`` with ``b_i = 1[||x_i|| <= C]`` plus N(0, sigma_b^2);
  each summand moves by at most 1/2 under add/remove, so the noise multiplier is ``2 sigma_b``.
- :func:`combine_gaussians`: Gaussian mechanisms on the *same* contributions, released together,
  are one Gaussian mechanism on the concatenated vector, with noise multiplier
  ``(sum_i z_i^-2)^-1/2`` (Andrew et al. 2021, Thm 1; Mironov 2017, Prop. 7 for RDP).

No transform draws randomness of its own choosing: the generator is a required argument, a
:class:`~fedcore.crypto.stream.CryptoRng`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from fedcore.crypto.stream import CryptoRng
from fedcore.errors import ConfigError, InvalidMessage
from fedcore.privacy.events import GaussianEvent, NoPrivacyLoss, PrivacyEvent
from fedcore.privacy.noise import add_grid_gaussian

T = TypeVar("T")
Update = list[np.ndarray]


@dataclass(frozen=True, slots=True)
class Transformed(Generic[T]):
    """A transform's output and the event its release implies."""

    value: T
    event: PrivacyEvent


def _positive(name: str, value: float) -> float:
    if not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def check_update(update: Sequence[np.ndarray], *, shapes: Sequence[tuple[int, ...]]) -> None:
    """Raise :class:`InvalidMessage` unless ``update`` is finite float arrays of ``shapes``."""
    if len(update) != len(shapes):
        raise InvalidMessage(f"update has {len(update)} arrays, expected {len(shapes)}")
    for i, (arr, shape) in enumerate(zip(update, shapes, strict=True)):
        if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
            raise InvalidMessage(f"update array {i} must be a float numpy array, got {arr!r:.80}")
        if tuple(arr.shape) != tuple(shape):
            raise InvalidMessage(f"update array {i} has shape {arr.shape}, expected {tuple(shape)}")
        if not np.all(np.isfinite(arr)):
            raise InvalidMessage(f"update array {i} holds NaN or infinite values")


def global_norm(update: Sequence[np.ndarray]) -> float:
    """The L2 norm of all arrays of ``update`` taken as one vector."""
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in update))


def clip_to_norm(update: Sequence[np.ndarray], *, clip_norm: float) -> Transformed[Update]:
    """``update * min(1, clip_norm / ||update||)`` in float64; event :class:`NoPrivacyLoss`."""
    clip_norm = _positive("clip_norm", clip_norm)
    norm = global_norm(update)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    return Transformed([np.asarray(a, dtype=np.float64) * scale for a in update], NoPrivacyLoss())


def sum_updates(
    updates: Sequence[Sequence[np.ndarray]], *, shapes: Sequence[tuple[int, ...]]
) -> Update:
    """The element-wise sum of ``updates`` in float64 (zeros of ``shapes`` when there are none)."""
    total = [np.zeros(s, dtype=np.float64) for s in shapes]
    for update in updates:
        for acc, arr in zip(total, update, strict=True):
            acc += arr
    return total


def add_gaussian_noise(
    update: Sequence[np.ndarray], *, std: float, sensitivity: float, rng: CryptoRng
) -> Transformed[Update]:
    """Add noise of standard deviation ``std`` to every coordinate, drawn from ``rng``.

    The noise is :func:`fedcore.privacy.noise.add_grid_gaussian` over the whole update (one grid
    for all arrays): every output coordinate is a multiple of a power of two. The event is :class:`GaussianEvent` with noise multiplier ``std / sensitivity``, where
    ``sensitivity`` is the L2 bound the caller guarantees on one unit's effect on ``update``.
    """
    std = _positive("std", std)
    sensitivity = _positive("sensitivity", sensitivity)
    if not isinstance(rng, CryptoRng):
        raise ConfigError(f"noise must come from a CryptoRng, got {type(rng).__name__}")
    sizes = [int(np.size(a)) for a in update]
    flat = (
        np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in update])
        if update
        else np.zeros(0)
    )
    noised, _ = add_grid_gaussian(flat, std=std, sensitivity=sensitivity, rng=rng)
    out: Update = []
    offset = 0
    for arr, size in zip(update, sizes, strict=True):
        out.append(noised[offset : offset + size].reshape(np.shape(arr)))
        offset += size
    return Transformed(out, GaussianEvent(noise_multiplier=std / sensitivity))


def scale_update(update: Sequence[np.ndarray], *, factor: float) -> Update:
    """``update * factor`` (post-processing: no event)."""
    return [np.asarray(a, dtype=np.float64) * factor for a in update]


def noisy_clipped_count(
    norms: Sequence[float], *, clip_norm: float, noise_std: float, rng: CryptoRng
) -> Transformed[float]:
    """Sum of ``1[norm <= clip_norm] - 1/2`` over ``norms`` plus N(0, noise_std^2) from ``rng``.

    Andrew et al. 2021, Alg. 1: with centred bits, one contribution moves the sum by at most 1/2,
    so the event is :class:`GaussianEvent` with noise multiplier ``2 * noise_std``.
    """
    clip_norm = _positive("clip_norm", clip_norm)
    return noisy_count(
        sum((1.0 if n <= clip_norm else 0.0) - 0.5 for n in norms), noise_std=noise_std, rng=rng
    )


def noisy_count(centred: float, *, noise_std: float, rng: CryptoRng) -> Transformed[float]:
    """``centred`` (a sum of ``b_i - 1/2`` with bits ``b_i``) plus N(0, noise_std^2) from ``rng``.

    The caller guarantees each contribution moves ``centred`` by at most 1/2 (a centred bit), so
    the event is :class:`GaussianEvent` with noise multiplier ``2 * noise_std``. Used where only
    the count of bits is known (under secure aggregation the server sees the sum alone).
    """
    noise_std = _positive("noise_std", noise_std)
    if not isinstance(rng, CryptoRng):
        raise ConfigError(f"noise must come from a CryptoRng, got {type(rng).__name__}")
    noised, _ = add_grid_gaussian(
        np.array([float(centred)]), std=noise_std, sensitivity=0.5, rng=rng
    )
    noisy = float(noised[0])
    return Transformed(noisy, GaussianEvent(noise_multiplier=2.0 * noise_std))


def combine_gaussians(events: Sequence[GaussianEvent]) -> GaussianEvent:
    """One Gaussian event for Gaussian releases on the same contributions (Andrew et al., Thm 1).

    Every event must have count 1: they describe parts of one release, not a sequence.
    """
    if not events or any(not isinstance(e, GaussianEvent) or e.count != 1 for e in events):
        raise ConfigError(f"combine_gaussians needs Gaussian events of count 1, got {events!r}")
    return GaussianEvent(noise_multiplier=sum(e.noise_multiplier**-2 for e in events) ** -0.5)
