"""Flower 1.41's SecAgg+ as a Flower user runs it: the peer of benchmarks/secagg_vs_flower.py.

SecAgg+ exists only on Flower's legacy API, so this is Flower's own secure-aggregation example
reduced to the benchmark's needs: a ServerApp running ``DefaultWorkflow(fit_workflow=
SecAggPlusWorkflow(num_shares, reconstruction_threshold, ...))`` over a ``LegacyContext`` with the
legacy ``FedAvg``, and a ClientApp built from a ``NumPyClient`` with ``mods=[secaggplus_mod]``.

Everything except the protocol is fedcore's, so the two sides differ only in secure aggregation:
the same sites (fedcore's synthetic partitions, by ``partition-id``), the same model
(``bench_linear:linear``) and initial weights, the same local training and site evaluation
(:func:`fedcore.federation.site.rounds.train_round` / ``evaluate_round``), and the same per-round work as
``fedcore simulate``: train every site, evaluate on every site, evaluate centrally on the server's
holdout.

The ServerApp writes ``out`` (JSON): each round's end time (after the federated evaluation, as
fedcore's ``ended_at``), the central accuracy, and what ``aggregate_fit`` received each round. A
round whose SecAgg+ halted never reaches ``aggregate_fit``; the benchmark refuses to time such a
run.
"""

import json
import time

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_evaluate_workflow
from flwr.serverapp import Grid, ServerApp

from fedcore.config import Settings, SyntheticSettings
from fedcore.data import load_holdout
from fedcore.federation.server.serve import initial_model
from fedcore.federation.site.data import data_settings, site_data
from fedcore.federation.site.rounds import evaluate_round, train_round
from fedcore.models import build_model
from fedcore.training import evaluate

MODEL = "bench_linear:linear"
CPU = torch.device("cpu")


def settings_of(cfg: dict) -> Settings:
    """fedcore's settings for the same federation ``fedcore simulate`` runs in the benchmark."""
    return Settings(
        sites=int(cfg["sites"]),
        rounds=int(cfg["rounds"]),
        dataset="synthetic",
        model=MODEL,
        local_epochs=int(cfg["local_epochs"]),
        batch_size=int(cfg["batch_size"]),
        lr=float(cfg["lr"]),
        seed=int(cfg["seed"]),
        device="cpu",
        synthetic=SyntheticSettings(
            samples=int(cfg["samples"]),
            features=int(cfg["features"]),
            classes=int(cfg["classes"]),
        ),
    )


def _keys() -> list[str]:
    return list(build_model(MODEL, input_shape=(1,), num_classes=2).state_dict())


class Site(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.settings = settings_of(dict(context.run_config))
        self.site = site_data(self.settings, context.node_config)
        self.input_shape = tuple(self.site.train.x.shape[1:])
        self.classes = self.settings.synthetic.classes

    def _state(self, parameters: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return {
            k: torch.from_numpy(np.asarray(p)) for k, p in zip(_keys(), parameters, strict=True)
        }

    def fit(self, parameters, config):  # noqa: ANN001, ANN201 - NumPyClient's signature
        outcome = train_round(
            self.settings,
            site=self.site,
            global_state=self._state(parameters),
            num_classes=self.classes,
            input_shape=self.input_shape,
            server_round=int(config["server_round"]),
        )
        arrays = [v.numpy() for v in outcome.state.values()]
        return arrays, outcome.num_examples, {"train_loss": outcome.train_loss}

    def evaluate(self, parameters, config):  # noqa: ANN001, ANN201 - NumPyClient's signature
        result = evaluate_round(
            self.settings,
            site=self.site,
            global_state=self._state(parameters),
            num_classes=self.classes,
            input_shape=self.input_shape,
        )
        return result.loss, result.num_examples, {"eval_accuracy": result.accuracy}


def client_fn(context: Context):  # noqa: ANN201 - flwr.client.Client
    torch.set_num_threads(1)
    return Site(context).to_client()


client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


class RecordingFedAvg(FedAvg):
    """Flower's legacy FedAvg, noting what each round's ``aggregate_fit`` received."""

    def __init__(self, **kwargs) -> None:  # noqa: ANN003 - FedAvg's keywords, unchanged
        super().__init__(**kwargs)
        self.fits: list[dict[str, int]] = []

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201
        self.fits.append(
            {"round": server_round, "results": len(results), "failures": len(failures)}
        )
        return super().aggregate_fit(server_round, results, failures)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = dict(context.run_config)
    settings = settings_of(cfg)
    holdout, input_shape, num_classes = load_holdout(data_settings(settings))
    model = initial_model(settings, input_shape=input_shape, num_classes=num_classes)
    initial = [v.detach().cpu().numpy() for v in model.state_dict().values()]
    ends: list[float] = []
    accuracy: list[float] = []

    def central(server_round, ndarrays, config):  # noqa: ANN001, ANN202
        model.load_state_dict(
            {k: torch.from_numpy(np.asarray(a)) for k, a in zip(_keys(), ndarrays, strict=True)}
        )
        result = evaluate(model, holdout.x, holdout.y, device=CPU)
        if server_round > 0:
            accuracy.append(result.accuracy)
        return result.loss, {"accuracy": result.accuracy}

    sites = int(cfg["sites"])
    strategy = RecordingFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=sites,
        min_evaluate_clients=sites,
        min_available_clients=sites,
        evaluate_fn=central,
        on_fit_config_fn=lambda rnd: {"server_round": rnd},
        initial_parameters=ndarrays_to_parameters(initial),
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=int(cfg["rounds"])), strategy=strategy
    )

    def evaluate_then_stamp(grid: Grid, context: Context) -> None:
        default_evaluate_workflow(grid, context)
        ends.append(time.time())
        write()  # after every round, so a run stopped at its time limit still shows its progress

    def write() -> None:
        with open(str(cfg["out"]), "w") as fh:
            json.dump({"ended_at": ends, "accuracy": accuracy, "fits": strategy.fits}, fh)

    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=int(cfg["num_shares"]),
            reconstruction_threshold=int(cfg["threshold"]),
            clipping_range=float(cfg["clip_range"]),
            timeout=float(cfg["timeout"]),
        ),
        evaluate_workflow=evaluate_then_stamp,
    )
    workflow(grid, legacy)
    write()
