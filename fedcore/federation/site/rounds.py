"""What a site does in a round, as plain library calls (the ClientApp only translates messages).

Given its data (:mod:`fedcore.federation.site.data`), a site builds the model the server names,
loads the global weights, trains locally and returns its new weights and example count; or
evaluates the global weights on its own test split.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedcore.config import Settings
from fedcore.crypto import CryptoRng
from fedcore.data import SiteData
from fedcore.errors import BudgetExceededError, RemoteProtocolError
from fedcore.federation.site import release as site_release
from fedcore.federation.site.folders import SiteDeclined, record_level, site_ledger, site_state_dir
from fedcore.federation.site.release import Release, ReleaseKey
from fedcore.federation.site.store import SiteStore
from fedcore.models import build_model
from fedcore.protections import protections_of
from fedcore.training import EvalResult, evaluate, pick_device, train_epochs

log = logging.getLogger(__name__)

# The weight a site with record-level DP reports instead of its example count (point 3 of issue 11).
RECORD_DP_WEIGHT = 1


def round_seed(seed: int, site_id: int, server_round: int) -> int:
    """A per-site, per-round seed for batch order (not for any privacy noise)."""
    digest = hashlib.sha256(f"fedcore.batches|{seed}|{site_id}|{server_round}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True, slots=True)
class SiteUpdate:
    state: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float | None  # None under DP-SGD: the loss is not covered by the guarantee
    site_epsilon: float | None = None  # record-level spend after this round (DP-SGD only)
    site_charges: int | None = None  # entries of the site's ledger after this round (DP-SGD only)


__all__ = ["SiteDeclined", "SiteUpdate", "evaluate_round", "round_seed", "train_round"]


def _model_with(
    settings: Settings,
    site: SiteData,
    num_classes: int,
    input_shape: tuple[int, ...],
    state: Mapping[str, torch.Tensor],
) -> torch.nn.Module:
    if tuple(site.train.x.shape[1:]) != input_shape:
        raise RemoteProtocolError(
            f"server's model takes input {list(input_shape)}, site {site.site_id} has {list(site.train.x.shape[1:])}"
        )
    for split in (site.train, site.test):
        if split.y.size and int(split.y.max()) >= num_classes:
            raise RemoteProtocolError(
                f"site {site.site_id} has class id {int(split.y.max())}, "
                f"but the server's model has {num_classes} classes"
            )
    model = build_model(settings.model, input_shape=input_shape, num_classes=num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RemoteProtocolError(
            f"global model does not fit model {settings.model!r}: {exc}"
        ) from exc
    return model


def _threads(settings: Settings) -> None:
    torch.set_num_threads(max(1, int(settings.client_cpus)))


def train_round(
    settings: Settings,
    *,
    site: SiteData,
    global_state: Mapping[str, torch.Tensor],
    num_classes: int,
    input_shape: tuple[int, ...],
    server_round: int,
    node_config: Mapping[str, Any] | None = None,
    proximal_mu: float = 0.0,
    release: ReleaseKey | None = None,
) -> SiteUpdate | SiteDeclined:
    """Train the global model on the site's training split for ``settings.local_epochs``.

    With record-level DP on (``dp.site.epsilon`` set) the site trains with DP-SGD and charges its
    ledger (:mod:`fedcore.federation.site.folders`); if the round would pass its budget it trains
    nothing and returns :class:`SiteDeclined`, its ledger unchanged. ``release`` (the key of the
    question, :func:`~fedcore.federation.site.release.release_key`) lets it re-send, uncharged, the
    release it already made for exactly that question (:mod:`fedcore.federation.site.release`);
    never under secure aggregation, where ``release`` is ignored.
    """
    _threads(settings)
    model = _model_with(settings, site, num_classes, input_shape, global_state)
    protections = protections_of(settings)
    if protections.record is not None:
        if release is not None and protections.secagg is None:
            return _train_dp_once(
                settings, site, model, release=release, node_config=node_config or {}
            )
        return _train_dp(
            settings, site, model, server_round=server_round, node_config=node_config or {}
        )
    result = train_epochs(
        model,
        site.train.x,
        site.train.y,
        epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        device=pick_device(settings.device),
        seed=round_seed(settings.seed, site.site_id, server_round),
        proximal_mu=proximal_mu,
    )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return SiteUpdate(state=state, num_examples=len(site.train.y), train_loss=result.loss)


def _train_dp_once(
    settings: Settings,
    site: SiteData,
    model: torch.nn.Module,
    *,
    release: ReleaseKey,
    node_config: Mapping[str, Any],
) -> SiteUpdate | SiteDeclined:
    """:func:`_train_dp`, unless the site already released the answer to ``release``: then that
    release again, uncharged. A new release is stored before it is returned (before the reply
    leaves), all under the site's release lock, so one question is never trained twice at once."""
    store = SiteStore(site_state_dir(settings, node_config), site.site_id)
    with store.lock(site_release.LOCK):
        if (kept := site_release.lookup(store, release)) is not None:
            log.info(
                "fedcore site %d: round %d of run %s was answered before; re-sending that release "
                "(no new privacy charge)",
                site.site_id,
                release.server_round,
                release.run_id,
            )
            return SiteUpdate(
                state=kept.state,
                num_examples=kept.num_examples,
                train_loss=None,
                site_epsilon=kept.site_epsilon,
                site_charges=kept.site_charges,
            )
        outcome = _train_dp(
            settings, site, model, server_round=release.server_round, node_config=node_config
        )
        if isinstance(outcome, SiteUpdate) and outcome.site_epsilon is not None:
            try:
                site_release.record(
                    store,
                    release,
                    Release(
                        outcome.state,
                        outcome.num_examples,
                        outcome.site_epsilon,
                        outcome.site_charges,
                    ),
                )
            except OSError as exc:  # charged already: sending uncached risks only a second charge
                log.warning(
                    "fedcore site %d: could not keep the release of round %d (%s); if it is "
                    "asked again it trains and is charged again",
                    site.site_id,
                    release.server_round,
                    exc,
                )
        return outcome


def _train_dp(
    settings: Settings,
    site: SiteData,
    model: torch.nn.Module,
    *,
    server_round: int,
    node_config: Mapping[str, Any],
) -> SiteUpdate | SiteDeclined:
    from fedcore.privacy.dpsgd import train_dp_sgd

    ledger = site_ledger(settings, site_id=site.site_id, node_config=node_config)
    config = record_level(settings).dp_config()
    try:
        result = train_dp_sgd(
            model,
            site.train.x,
            site.train.y,
            config=config,
            ledger=ledger,
            rng=CryptoRng(),
            round_number=server_round,
            device=pick_device(settings.device),
        )
    except BudgetExceededError as exc:
        return SiteDeclined(
            site_epsilon=ledger.epsilon(), reason=str(exc), site_charges=len(ledger.entries)
        )
    # The example count stays at the site (issue 11, point 3): the accounting is add/remove-one
    # with q = B / n, which holds only while n is not released, so every DP-SGD site reports a
    # weight of 1 and the sites weigh equally.
    return SiteUpdate(
        state=result.state,
        num_examples=RECORD_DP_WEIGHT,
        train_loss=None,
        site_epsilon=result.epsilon,
        site_charges=len(ledger.entries),
    )


def evaluate_round(
    settings: Settings,
    *,
    site: SiteData,
    global_state: Mapping[str, torch.Tensor],
    num_classes: int,
    input_shape: tuple[int, ...],
) -> EvalResult:
    """Loss and accuracy of the global model on the site's test split."""
    _threads(settings)
    model = _model_with(settings, site, num_classes, input_shape, global_state)
    return evaluate(model, site.test.x, site.test.y, device=pick_device(settings.device))
