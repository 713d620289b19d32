"""A bare Flower Message-API FedAvg app: what a user writes from Flower's own quickstart.

Same model (fedcore's MLP), same sites (fedcore's digits partitions), same local loop and the same
per-round work as fedcore's app: federated training, federated evaluation, central evaluation on
the server's held-out set. Round end times and accuracies go to ``out`` (JSON) for the benchmark.
"""

import json
import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedcore.data import DataSettings, load_holdout, load_site
from fedcore.models import build_model
from fedcore.training import evaluate, train_epochs

client = ClientApp()
server = ServerApp()
CPU = torch.device("cpu")


def _data(cfg) -> DataSettings:
    """The run's data: digits by default, synthetic with ``dataset``/``samples`` (benchmarks/scale.py)."""
    return DataSettings(
        sites=int(cfg["sites"]),
        dataset=str(cfg.get("dataset", "digits")),
        synthetic_samples=int(cfg.get("samples", 2000)),
    )


def _model(data: DataSettings) -> torch.nn.Module:
    _, shape, classes = load_holdout(data)
    return build_model("mlp", input_shape=shape, num_classes=classes)


@client.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    cfg = context.run_config
    data = _data(cfg)
    site = load_site(data, int(context.node_config["partition-id"]))
    model = _model(data)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    result = train_epochs(
        model,
        site.train.x,
        site.train.y,
        epochs=int(cfg["local_epochs"]),
        batch_size=int(cfg["batch_size"]),
        lr=float(cfg["lr"]),
        device=CPU,
        seed=0,
    )
    metrics = MetricRecord({"num-examples": len(site.train.y), "train_loss": result.loss})
    return Message(
        RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg
    )


@client.evaluate()
def evaluate_site(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    data = _data(context.run_config)
    site = load_site(data, int(context.node_config["partition-id"]))
    model = _model(data)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    result = evaluate(model, site.test.x, site.test.y, device=CPU)
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "eval_loss": result.loss,
            "eval_accuracy": result.accuracy,
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    data = _data(cfg)
    holdout, _, _ = load_holdout(data)
    torch.manual_seed(0)
    model = _model(data)
    ends: list[float] = []
    accuracy: list[float] = []

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        result = evaluate(model, holdout.x, holdout.y, device=CPU)
        ends.append(time.time())
        accuracy.append(result.accuracy)
        return MetricRecord({"accuracy": result.accuracy})

    strategy = FedAvg(
        min_train_nodes=int(cfg["sites"]),
        min_evaluate_nodes=int(cfg["sites"]),
        min_available_nodes=int(cfg["sites"]),
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(cfg["rounds"]),
        evaluate_fn=central,
    )
    with open(str(cfg["out"]), "w") as fh:
        json.dump({"ended_at": ends, "accuracy": accuracy}, fh)
