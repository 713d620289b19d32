"""Regenerate the SecAgg transcript vectors: ``python tests/vectors/make_secagg_vectors.py``.

Each case runs :func:`fedcore.secagg.run_in_memory` with a fixed seed and records every message in
the order the harness exchanged them (server -> client "down", client -> server "up"), the inputs,
the survivors and the total. Small cases keep the full bytes in hex; larger ones keep a SHA-256
per message. ``tests/secagg/test_vectors.py`` replays each case and compares byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fedcore.crypto import CryptoRng
from fedcore.secagg import Mode, run_in_memory

HERE = Path(__file__).parent

CASES: dict[str, dict[str, Any]] = {
    "secagg_complete_n4": {
        "n": 4,
        "length": 8,
        "bits": 32,
        "neighbors": None,
        "mode": "SEMI_HONEST",
        "dropouts": {},
        "seed": 20240601,
        "full": True,
    },
    "secagg_harary_dropouts_n10": {
        "n": 10,
        "length": 64,
        "bits": 20,
        "neighbors": 4,
        "mode": "SEMI_HONEST",
        "dropouts": {"share": [3], "masked_input": [7], "unmask": [1]},
        "seed": 7,
        "full": False,
    },
    "secagg_active_n7": {
        "n": 7,
        "length": 16,
        "bits": 62,
        "neighbors": None,
        "mode": "ACTIVE",
        "dropouts": {"masked_input": [4], "consistency": [2]},
        "seed": 99,
        "full": False,
    },
}


def inputs_for(case: dict[str, Any]) -> dict[int, Any]:
    rng = CryptoRng.from_seed(case["seed"], purpose="vectors.inputs")
    return {c: rng.integers_below_pow2(case["length"], case["bits"]) for c in range(case["n"])}


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    inputs = inputs_for(case)
    report = run_in_memory(
        inputs,
        bits=case["bits"],
        neighbors=case["neighbors"],
        dropouts=case["dropouts"],
        seed=case["seed"],
        mode=Mode[case["mode"]],
        keep_transcript=True,
    )
    if case["full"]:
        transcript = [[d, c, m.hex()] for d, c, m in report.transcript]
    else:
        transcript = [[d, c, hashlib.sha256(m).hexdigest()] for d, c, m in report.transcript]
    return {
        "case": case,
        "inputs": {str(c): [int(v) for v in x] for c, x in inputs.items()},
        "threshold": report.threshold,
        "survivors": list(report.survivors),
        "total": [int(v) for v in report.total],
        "transcript": transcript,
    }


def main() -> None:
    for name, case in CASES.items():
        path = HERE / f"{name}.json"
        path.write_text(json.dumps(run_case(case), indent=1) + "\n")
        print("wrote", path)


if __name__ == "__main__":
    main()
