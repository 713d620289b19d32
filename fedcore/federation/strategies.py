"""Flower Message-API strategies, chosen by name.

Sampling is left to the strategy, but fedcore's driver waits for the sites itself (with a
deadline), so the strategy's own minimums are set to 1: Flower's sampler waits without a deadline
for ``min_available_nodes``, and would hang a run whose site went away.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from fedcore.config import Settings


def build_strategy(settings: Settings) -> Strategy:
    fraction = settings.fraction_train
    if settings.strategy == "fedavg":
        return FedAvg(
            fraction_train=fraction,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
        )
    if settings.strategy == "fedprox":
        return FedProx(
            fraction_train=fraction,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
            proximal_mu=settings.proximal_mu,
        )
    if settings.strategy == "fedadam":
        return FedAdam(
            fraction_train=fraction,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
            eta=settings.server_lr,
            eta_l=settings.lr,
        )
    raise AssertionError(f"unreachable: strategy {settings.strategy!r} passed validation")
