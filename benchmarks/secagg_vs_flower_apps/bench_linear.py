"""The benchmark's model: one linear layer, so its parameter count d is exactly what the data's
shape makes it (features x classes weights + classes biases). ``fedcore simulate`` loads it with
``--set model=bench_linear:linear``; the SecAgg+ app builds it through the same fedcore call."""

import math
from collections.abc import Sequence

from torch import nn


def linear(*, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def features_for(d: int, classes: int) -> int:
    """The number of synthetic features that gives ``linear`` as close to d parameters as can be
    (exactly d when d is a multiple of ``classes``)."""
    return max(1, round(d / classes) - 1)
