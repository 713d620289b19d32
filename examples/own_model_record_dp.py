"""Your own torch model and your own .npz data, trained across sites with record-level DP.

    python examples/own_model_record_dp.py [FOLDER]     # default folder: runs/examples
    FEDCORE_EXAMPLE_SMOKE=1 python examples/own_model_record_dp.py   # a tiny run

Every site trains with DP-SGD (per-example clipping and Gaussian noise, Abadi et al. 2016): over
the whole run each site spends at most epsilon 4 (delta 1e-5) on any one of its own records.
Full mode (5 sites, 10 rounds) reaches about 0.79 held-out accuracy on these clusters.
"""

import os
import sys
import time
from pathlib import Path

import numpy as np
from torch import nn

import fedcore

SMOKE = os.environ.get("FEDCORE_EXAMPLE_SMOKE") == "1"


class Net(nn.Module):
    """Any model Opacus supports (no BatchNorm); fedcore calls Net(input_shape=, num_classes=)."""

    def __init__(self, *, input_shape, num_classes):
        super().__init__()
        width = int(np.prod(input_shape))
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, num_classes)
        )

    def forward(self, x):
        return self.layers(x)


def write_data(path, *, samples):
    """Seeded Gaussian clusters (4 classes, 16 features) as .npz with arrays x and y."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=samples)
    x = rng.normal(0.0, 0.5, size=(4, 16))[y] + rng.normal(size=(samples, 16))
    np.savez(path, x=x.astype(np.float32), y=y)
    return path


if __name__ == "__main__":  # the sites import this file again to find Net
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/examples")
    folder.mkdir(parents=True, exist_ok=True)
    data = write_data(folder / "clusters.npz", samples=600 if SMOKE else 6000)
    settings = fedcore.settings(
        sites=2 if SMOKE else 5,
        rounds=1 if SMOKE else 10,
        local_epochs=1,
        batch_size=64,
        lr=0.5,
        **{"dp.site.epsilon": 4.0, "dp.site.delta": 1e-5},
    )
    out = folder / f"own-model-{time.strftime('%Y%m%d-%H%M%S')}"
    record = fedcore.simulate(settings, out=out, model=Net, data=data)
    print(
        f"{record.status}, {record.rounds_completed} of {settings.rounds} rounds: "
        f"accuracy {record.final_accuracy:.3f}; record-level epsilon spent {record.record_epsilon:.2f} of 4 (delta 1e-5)"
    )
    print(f"run record: {record.path}")
