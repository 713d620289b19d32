"""What the simulation benchmarks share: the steady-state round time, the refusal to time a run
that did not train, and the bare-Flower peer (benchmarks/bare_flower_app, Flower's own
Message-API ``FedAvg.start`` with one Flower node per site, on the same simulation engine as
fedcore, in a fresh process).

Imported by ``benchmarks/scale.py`` and ``benchmarks/simulation_overhead.py``, which run as scripts
(their folder is first on the import path).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BARE = ROOT / "benchmarks" / "bare_flower_app"
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}


def steady(ends: list[float]) -> float:
    """The median gap between successive round ends."""
    gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return statistics.median(gaps)


def learned(name: str, accuracy: list[float], failed: list[int], *, above: float) -> None:
    """Refuse to time a run that did not train (a failed site, or a final accuracy not above
    ``above``): a failing engine looks fast."""
    if any(failed) or not accuracy or not accuracy[-1] > above:
        raise SystemExit(
            f"{name}: the run did not train properly (accuracy {accuracy}, failed sites {failed})"
        )


def bare_flower(sites: int, run_config: Mapping[str, object], out: Path) -> dict:
    """Run the bare-Flower app for ``sites`` sites with ``run_config`` (which names ``out``, the
    JSON file the app writes: per-round ``ended_at`` and ``accuracy``, index 0 the initial
    evaluation); return what it wrote."""
    code = f"""
from pathlib import Path
from fedcore.federation.simulation.engine import run_app
run_app(Path({str(BARE)!r}), server_app="bare_app:server", client_app="bare_app:client",
        run_config={dict(run_config)!r}, sites={sites},
        backend={{"client_resources": {{"num_cpus": 1, "num_gpus": 0}},
                 "init_args": {{"num_cpus": {os.cpu_count()}, "include_dashboard": False}}}})
"""
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env={**ENV, "PYTHONPATH": os.pathsep.join([str(BARE), str(ROOT)])},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return json.loads(out.read_text())
