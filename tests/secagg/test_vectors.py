"""Fixed seeds give exactly the stored transcripts (tests/vectors/secagg_*.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.vectors.make_secagg_vectors import CASES, inputs_for, run_case

VECTORS = Path(__file__).parents[1] / "vectors"


@pytest.mark.parametrize("name", sorted(CASES))
def test_transcript_matches_the_stored_vector(name: str) -> None:
    stored = json.loads((VECTORS / f"{name}.json").read_text())
    assert stored["case"] == CASES[name]
    fresh = run_case(CASES[name])
    assert fresh["inputs"] == stored["inputs"]
    assert fresh["threshold"] == stored["threshold"]
    assert fresh["survivors"] == stored["survivors"]
    assert fresh["total"] == stored["total"]
    assert len(fresh["transcript"]) == len(stored["transcript"])
    for i, (a, b) in enumerate(zip(fresh["transcript"], stored["transcript"], strict=True)):
        assert a == b, f"message {i} differs"


@pytest.mark.parametrize("name", sorted(CASES))
def test_stored_total_is_the_plain_sum(name: str) -> None:
    stored = json.loads((VECTORS / f"{name}.json").read_text())
    case = stored["case"]
    inputs = inputs_for(case)
    total = np.zeros(case["length"], dtype=object)
    for c in stored["survivors"]:
        total = total + inputs[c].astype(object)
    assert stored["total"] == [int(v) % (1 << case["bits"]) for v in total]
    dropped = {c for ids in case["dropouts"].values() for c in ids}
    assert len(stored["survivors"]) < case["n"] or not dropped
