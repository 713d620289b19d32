"""Plain PyTorch train and evaluate loops for one site (no privacy; DP-SGD is fedcore.privacy).

Data arrive as numpy arrays (:class:`fedcore.data.ArrayDataset`) small enough for a site's memory;
they are moved to the device once and batched by index, which is faster than a DataLoader for
in-memory arrays. Shuffling uses a seeded ``torch.Generator``: it decides only the batch order, not
any privacy noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedcore.config import Device
from fedcore.errors import ConfigError


def pick_device(preference: Device) -> torch.device:
    """``"auto"``: CUDA when present, else CPU. ``"cuda"`` without CUDA raises ConfigError."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for, but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass(frozen=True, slots=True)
class TrainResult:
    loss: float  # mean training loss over the last epoch
    steps: int


@dataclass(frozen=True, slots=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


def _tensors(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(x, dtype=torch.float32, device=device), torch.as_tensor(
        y, dtype=torch.long, device=device
    )


def train_epochs(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    device: torch.device,
    seed: int,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train ``model`` in place with SGD for ``epochs`` over ``(x, y)``.

    With ``proximal_mu > 0`` the FedProx term ``mu/2 * ||w - w_global||^2`` (Li et al., MLSys
    2020, eq. 2) is added to the loss, ``w_global`` being the weights the model had on entry.
    Plain SGD (:func:`sgd_step`), so no optimizer state crosses rounds.
    """
    if len(x) == 0:
        raise ConfigError("a site has no training samples")
    model.to(device).train()
    xt, yt = _tensors(x, y, device)
    params = list(model.parameters())
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    steps, epoch_loss = 0, 0.0
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator).to(device)
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for p in params:
                p.grad = None
            loss = loss_fn(model(xt[idx]), yt[idx])
            if anchor:
                loss = loss + 0.5 * proximal_mu * sum(
                    (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
            loss.backward()
            sgd_step(params, lr)
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            steps += 1
        epoch_loss = total / count
    return TrainResult(loss=epoch_loss, steps=steps)


@torch.no_grad()
def sgd_step(params: Sequence[torch.Tensor], lr: float) -> None:
    """One step of plain SGD, ``p <- p - lr * grad``: what ``torch.optim.SGD(params, lr)`` does
    without momentum or weight decay (its CPU path is this very ``add_``), written out because the
    first ``torch.optim`` optimizer in a process imports ``torch._dynamo``, 2-4 s here, paid by
    every Ray worker in the first round."""
    for p in params:
        if p.grad is not None:
            p.add_(p.grad, alpha=-lr)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, device: torch.device, batch_size: int = 1024
) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    if len(x) == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), num_examples=0)
    model.to(device).eval()
    xt, yt = _tensors(x, y, device)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(xt), batch_size):
        logits = model(xt[start : start + batch_size])
        target = yt[start : start + batch_size]
        loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return EvalResult(loss=loss_sum / len(xt), accuracy=correct / len(xt), num_examples=len(xt))
