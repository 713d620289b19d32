"""Flower Message-API strategies, chosen by name.

Sampling is left to the strategy, but fedcore's driver waits for the sites itself (with a
deadline), so the strategy's own minimums are set to 1: Flower's sampler waits without a deadline
for ``min_available_nodes``, and would hang a run whose site went away.

Two things fedcore adds to Flower's strategies:

- ``server_lr`` unset means Flower's own default for the chosen server optimizer
  (:data:`DEFAULT_SERVER_LR`), so ``fedavgm`` is not a near no-op at a learning rate meant for Adam;
- :func:`keep_dtypes`: Flower's server optimizers compute in float64 under NumPy 2 (FedAdam's
  bias-corrected step is a Python float times a float32 array), and a float64 global model would
  make every site's float32 reply fail fedcore's reply check. The driver casts every aggregate back
  to the global model's dtypes.

:func:`strategy_state` and :func:`restore_strategy_state` carry a server optimizer's memory (its
moments or momentum) across a checkpoint, as tensors so the checkpoint loads without pickle.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedYogi,
    Strategy,
)

from fedcore.config import LINEAR_STRATEGIES, Settings
from fedcore.errors import ConfigError
from fedcore.protections import nonlinear_refusal

_STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
}

# The Flower classes whose aggregate is a (weighted) mean of the replies, possibly followed by a
# server optimizer step: the ones the linear strategy names map to (fedcore.config.LINEAR_STRATEGIES).
LINEAR_CLASSES: tuple[type[FedAvg], ...] = tuple(_STRATEGIES[name] for name in LINEAR_STRATEGIES)


def check_linear(strategy: Strategy) -> None:
    """Raise ConfigError unless ``strategy`` aggregates linearly (secure aggregation gives the
    server only the sum, so it can serve nothing else)."""
    if type(strategy) not in LINEAR_CLASSES:
        raise ConfigError(nonlinear_refusal(type(strategy).__name__))


# Flower 1.41's defaults (FedAvgM's server_learning_rate, FedOpt's eta).
DEFAULT_SERVER_LR: dict[str, float] = {
    "fedavgm": 1.0,
    "fedadam": 0.1,
    "fedyogi": 0.01,
    "fedadagrad": 0.1,
}

# A server optimizer's memory across rounds (FedOpt's moments, FedAvgM's momentum).
_STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector")


def server_lr(settings: Settings) -> float | None:
    """The server learning rate the run uses (None for strategies without one)."""
    if settings.strategy not in DEFAULT_SERVER_LR:
        return None
    return (
        settings.server_lr
        if settings.server_lr is not None
        else DEFAULT_SERVER_LR[settings.strategy]
    )


def build_strategy(settings: Settings) -> Strategy:
    """The strategy named by ``settings.strategy``, with its server-side hyper-parameters."""
    lr = server_lr(settings)
    by_strategy: dict[str, dict[str, Any]] = {
        "fedprox": {"proximal_mu": settings.proximal_mu},
        "fedavgm": {"server_learning_rate": lr, "server_momentum": settings.server_momentum},
        "fedadam": {"eta": lr, "eta_l": settings.lr},
        "fedyogi": {"eta": lr, "eta_l": settings.lr},
        "fedadagrad": {"eta": lr, "eta_l": settings.lr},
    }
    options = by_strategy.get(settings.strategy, {})
    return _STRATEGIES[settings.strategy](
        fraction_train=settings.fraction_train,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
        **options,
    )


def keep_dtypes(aggregated: ArrayRecord, like: ArrayRecord) -> ArrayRecord:
    """``aggregated`` with every array cast to the dtype of the same key in ``like`` (the global
    model); the record itself when nothing needs casting."""
    if all(aggregated[k].dtype == like[k].dtype for k in aggregated.keys() if k in like):
        return aggregated
    return ArrayRecord(
        {
            k: Array(a.numpy().astype(like[k].numpy().dtype, copy=False)) if k in like else a
            for k, a in aggregated.items()
        }
    )


def _to_tensors(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": {k: _to_tensors(a.numpy()) for k, a in value.items()}}
    if isinstance(value, dict):
        return {str(k): _to_tensors(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_tensors(v) for v in value]
    raise ConfigError(f"cannot checkpoint strategy state of type {type(value).__name__}")


def _from_tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        if set(value) == {"__arrayrecord__"}:
            return ArrayRecord(
                {k: Array(_from_tensors(a)) for k, a in value["__arrayrecord__"].items()}
            )
        return {k: _from_tensors(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_tensors(v) for v in value]
    return value


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The strategy's memory across rounds, as nested dicts and lists of tensors."""
    return {
        name: _to_tensors(getattr(strategy, name))
        for name in _STATE_ATTRIBUTES
        if getattr(strategy, name, None) is not None
    }


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Give ``strategy`` back the memory :func:`strategy_state` took; raises :class:`ConfigError`
    for a state this strategy does not have (a checkpoint of another strategy)."""
    for name, value in state.items():
        if name not in _STATE_ATTRIBUTES or not hasattr(strategy, name):
            raise ConfigError(
                f"the checkpoint holds {name!r}, which strategy {type(strategy).__name__} does not keep"
            )
        setattr(strategy, name, _from_tensors(value))
