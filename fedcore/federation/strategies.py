"""Flower Message-API strategies, chosen by name.

Sampling is left to the strategy, but fedcore's driver waits for the sites itself (with a
deadline), so the strategy's own minimums are set to 1: Flower's sampler waits without a deadline
for ``min_available_nodes``, and would hang a run whose site went away.
"""

from __future__ import annotations

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
    if settings.strategy == "fedavgm":
        return FedAvgM(
            fraction_train=fraction,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
            server_learning_rate=settings.server_lr,
            server_momentum=settings.server_momentum,
        )
    if settings.strategy == "fedyogi":
        return FedYogi(
            fraction_train=fraction,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
            eta=settings.server_lr,
            eta_l=settings.lr,
        )
    if settings.strategy == "fedadagrad":
        return FedAdagrad(
            fraction_train=fraction,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
            eta=settings.server_lr,
            eta_l=settings.lr,
        )
    if settings.strategy == "fedmedian":
        return FedMedian(
            fraction_train=fraction, min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1
        )
    raise AssertionError(f"unreachable: strategy {settings.strategy!r} passed validation")
