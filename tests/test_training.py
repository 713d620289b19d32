import numpy as np
import torch

from fedcore.models import build_model
from fedcore.training import evaluate, train_epochs

CPU = torch.device("cpu")


def _blobs(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = (rng.normal(size=(n, 4)) + 3.0 * y[:, None]).astype(np.float32)
    return x, y.astype(np.int64)


def test_training_reduces_loss_and_is_reproducible():
    x, y = _blobs()
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("mlp", input_shape=(4,), num_classes=2)
        before = evaluate(model, x, y, device=CPU)
        train_epochs(model, x, y, epochs=3, batch_size=16, lr=0.1, device=CPU, seed=1)
        after = evaluate(model, x, y, device=CPU)
        results.append(after.loss)
    assert after.loss < before.loss
    assert after.accuracy > 0.9
    assert results[0] == results[1]


def test_proximal_term_keeps_weights_closer_to_the_start():
    x, y = _blobs()
    distances = []
    for mu in (0.0, 10.0):
        torch.manual_seed(0)
        model = build_model("mlp", input_shape=(4,), num_classes=2)
        start = [p.detach().clone() for p in model.parameters()]
        train_epochs(
            model, x, y, epochs=2, batch_size=16, lr=0.1, device=CPU, seed=1, proximal_mu=mu
        )
        distances.append(
            sum(
                float((p.detach() - s).pow(2).sum())
                for p, s in zip(model.parameters(), start, strict=True)
            )
        )
    assert distances[1] < distances[0]


def test_evaluate_counts_correct_predictions():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=np.float32)
    y = np.array([0, 1, 1, 1])
    result = evaluate(model, x, y, device=CPU)
    assert result.accuracy == 0.75 and result.num_examples == 4


def test_training_steps_exactly_as_torch_optim_sgd():
    """train_epochs writes plain SGD out (torch.optim imports torch._dynamo on first use): the
    weights it reaches are bit for bit those of torch.optim.SGD over the same batches, FedProx
    term included."""
    from torch import nn

    x, y = _blobs()
    for mu in (0.0, 0.5):
        torch.manual_seed(0)
        ours = build_model("mlp", input_shape=(4,), num_classes=2)
        reference = build_model("mlp", input_shape=(4,), num_classes=2)
        reference.load_state_dict(ours.state_dict())
        train_epochs(
            ours, x, y, epochs=2, batch_size=16, lr=0.1, device=CPU, seed=7, proximal_mu=mu
        )

        optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
        anchor = [p.detach().clone() for p in reference.parameters()]
        generator = torch.Generator().manual_seed(7)
        xt, yt = torch.as_tensor(x), torch.as_tensor(y)
        for _ in range(2):
            order = torch.randperm(len(xt), generator=generator)
            for start in range(0, len(order), 16):
                idx = order[start : start + 16]
                optimizer.zero_grad(set_to_none=True)
                loss = nn.CrossEntropyLoss()(reference(xt[idx]), yt[idx])
                if mu:
                    loss = loss + 0.5 * mu * sum(
                        (p - a).pow(2).sum() for p, a in zip(reference.parameters(), anchor, strict=True)
                    )
                loss.backward()
                optimizer.step()
        for a, b in zip(ours.state_dict().values(), reference.state_dict().values(), strict=True):
            assert torch.equal(a, b)
