"""A privacy-budget sweep: accuracy against epsilon for record-level DP-SGD, with its plot.

    python examples/budget_sweep.py [FOLDER]     # default folder: runs/examples
    FEDCORE_EXAMPLE_SMOKE=1 python examples/budget_sweep.py   # two tiny runs

The sweep is a fedcore experiment (the spec below; `fedcore experiment SPEC.toml` runs the same):
one simulated federation per epsilon and seed, each in its own process. A rerun into the same
folder skips the points already finished. DP noise is drawn from a CSPRNG: runs differ at a fixed
seed, so the seeds give the spread, not a replay.
"""

import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import fedcore  # noqa: E402

SMOKE = os.environ.get("FEDCORE_EXAMPLE_SMOKE") == "1"
SPEC = """
[experiment]
name = "budget_sweep"
[base]
dataset = "digits"
sites = {sites}
rounds = {rounds}
local_epochs = 1
batch_size = 64
lr = 1.0
[axes]
mode = ["record"]
epsilon = {epsilons}
seed = {seeds}
"""

if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/examples")
    folder.mkdir(parents=True, exist_ok=True)
    grid = (
        dict(sites=2, rounds=1, epsilons=[1, 8], seeds=[0])
        if SMOKE
        else dict(sites=10, rounds=10, epsilons=[0.5, 1, 2, 4, 8], seeds=[0, 1, 2])
    )
    spec = folder / ("budget_sweep-smoke.toml" if SMOKE else "budget_sweep.toml")
    spec.write_text(SPEC.format(**grid))
    sweep = fedcore.run_experiment(spec, out=folder / spec.stem, jobs=1)
    runs = sorted(
        (r.point.swept["epsilon"], r.final_accuracy)
        for r in sweep.results
        if r.final_accuracy is not None  # a run that failed before its first round has none
    )
    for epsilon, accuracy in runs:
        print(f"epsilon {epsilon:>4}: accuracy {accuracy:.3f}")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    epsilons = sorted({e for e, _ in runs})
    ax.plot([e for e, _ in runs], [a for _, a in runs], "o")  # one dot per run (seed)
    ax.set(xscale="log", ylim=(0, 1), xlabel="record-level epsilon (delta 1e-5)")
    ax.set(ylabel="held-out accuracy", xticks=epsilons, xticklabels=[f"{e:g}" for e in epsilons])
    ax.minorticks_off()
    fig.tight_layout()
    fig.savefig(folder / "budget_sweep.png", dpi=150)
    print(f"plot: {folder / 'budget_sweep.png'}; experiment: {sweep.path}")
