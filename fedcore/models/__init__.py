"""Models a site trains, chosen by name, built only from layers Opacus supports.

Opacus computes per-sample gradients for Linear, Conv2d and GroupNorm, among others; it refuses
BatchNorm (which mixes samples in a batch), so the CNN normalises with GroupNorm.

``build_model(name, input_shape=..., num_classes=...)`` takes ``"mlp"``, ``"cnn"`` or a user model
as ``"package.module:callable"``; the callable is called with the same two keyword arguments and
must return a ``torch.nn.Module``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fedcore.errors import ConfigError

BUILTIN_MODELS = ("mlp", "cnn")


class MLP(nn.Module):
    """Flatten, then fully connected layers with ReLU."""

    def __init__(self, *, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (64, 64)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 convolutions with GroupNorm, global average pooling, one linear head.

    Takes images of shape (channels, height, width); a flat feature vector whose length is a
    square number is viewed as a one-channel square image (8x8 digits arrive as 64 features).
    """

    def __init__(self, *, input_shape: Sequence[int], num_classes: int, width: int = 16):
        super().__init__()
        self.image_shape = _image_shape(input_shape)
        channels = self.image_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.GroupNorm(4, width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GroupNorm(4, 2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(x.shape[0], *self.image_shape)))


def _image_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    if len(shape) == 2:
        return (1, *shape)  # type: ignore[return-value]
    side = math.isqrt(shape[0]) if len(shape) == 1 else 0
    if len(shape) == 1 and side * side == shape[0]:
        return (1, side, side)
    raise ConfigError(
        f"model 'cnn' needs image input (C,H,W), (H,W) or a square number of features; got shape {shape}"
    )


def build_model(name: str, *, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build the model called ``name``.

    Raises :class:`ConfigError` for an unknown name, a user reference that does not import, or a
    callable that does not return a ``torch.nn.Module``.
    """
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    factory = model_factory(name)
    model = factory(input_shape=tuple(input_shape), num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The callable that builds the model called ``name`` (``factory(input_shape=...,
    num_classes=...)``), found without loading any data: a built-in class, or the user's
    ``package.module:callable`` imported. Raises :class:`ConfigError` for an unknown name or a
    reference that does not import."""
    if name == "mlp":
        return MLP
    if name == "cnn":
        return SmallCNN
    if ":" not in name:
        raise ConfigError(
            f"unknown model {name!r}: expected one of {', '.join(BUILTIN_MODELS)} or 'package.module:callable'"
        )
    module_name, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model {name!r} could not be loaded: {exc}") from exc
