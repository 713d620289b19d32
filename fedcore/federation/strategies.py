"""Flower Message-API strategies, chosen by name.

Sampling is left to the strategy, but fedcore's driver waits for the sites itself (with a
deadline), so the strategy's own minimums are set to 1: Flower's sampler waits without a deadline
for ``min_available_nodes``, and would hang a run whose site went away.
"""

from __future__ import annotations

from typing import Any

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

from fedcore.config import Settings

_STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
}


def build_strategy(settings: Settings) -> Strategy:
    """The strategy named by ``settings.strategy``, with its server-side hyper-parameters."""
    options: dict[str, Any] = {
        "fedprox": {"proximal_mu": settings.proximal_mu},
        "fedavgm": {
            "server_learning_rate": settings.server_lr,
            "server_momentum": settings.server_momentum,
        },
        "fedadam": {"eta": settings.server_lr, "eta_l": settings.lr},
        "fedyogi": {"eta": settings.server_lr, "eta_l": settings.lr},
        "fedadagrad": {"eta": settings.server_lr, "eta_l": settings.lr},
    }.get(settings.strategy, {})
    return _STRATEGIES[settings.strategy](
        fraction_train=settings.fraction_train,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
        **options,
    )
