"""What the server sees of one client, its masked vector, looks uniform whatever the input."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.secagg.messages import MaskedInput

from .helpers import make_world

# Chi-square bounds: 255 degrees of freedom have mean 255 and sd 22.6; 400 is 6.4 sd out.
# The tests use fixed seeds, so they are deterministic; the bound says how far from uniform a
# vector may be before we call the masking broken (an unmasked input scores in the thousands).
CHI2_BOUND_255 = 400.0


def _chi2_bytes(values: np.ndarray) -> float:
    counts = np.bincount(values.astype(np.int64), minlength=256)
    expected = len(values) / 256
    return float(((counts - expected) ** 2 / expected).sum())


def _masked(bits: int, inputs: str, neighbors: int = 0) -> list[np.ndarray]:
    w = make_world(5, length=40_000, bits=bits, neighbors=neighbors, seed=40)
    for c in w.inputs:
        if inputs == "zeros":
            w.inputs[c] = np.zeros(40_000, dtype=np.uint64)
        elif inputs == "ramp":
            w.inputs[c] = (np.arange(40_000, dtype=np.uint64) % 7).astype(np.uint64)
    w.step()
    w.step()
    out = []
    for c in sorted(w.requests):
        m = w.answer(c)
        assert isinstance(m, MaskedInput)
        out.append(m.vector)
    return out


@pytest.mark.parametrize("inputs", ["zeros", "ramp"])
@pytest.mark.parametrize(("bits", "neighbors"), [(32, 0), (8, 0), (20, 2)])
def test_masked_vectors_pass_a_chi_square_test(inputs: str, bits: int, neighbors: int) -> None:
    for y in _masked(bits, inputs, neighbors):
        assert int(y.max()) < (1 << bits)
        low = y & 0xFF
        high = (y >> (bits - 8)) & 0xFF
        assert _chi2_bytes(low) < CHI2_BOUND_255
        assert _chi2_bytes(high) < CHI2_BOUND_255
        # each bit set about half the time: 40,000 draws, sd 100, bound 6 sd
        for b in range(bits):
            ones = (
                int(((y >> np.uint64(b)) & 1).sum())
                if y.dtype == np.uint64
                else int(((y >> b) & 1).sum())
            )
            assert abs(ones - 20_000) < 600


def test_the_chi_square_test_catches_an_unmasked_input() -> None:
    ramp = (np.arange(40_000) % 7).astype(np.uint64)
    assert _chi2_bytes(ramp & 0xFF) > 10 * CHI2_BOUND_255


def test_two_clients_masked_vectors_are_not_correlated() -> None:
    ys = _masked(32, "zeros")
    a, b = (ys[0].astype(np.float64), ys[1].astype(np.float64))
    r = np.corrcoef(a, b)[0, 1]
    assert abs(r) < 6 / np.sqrt(len(a))  # 6 sd of the sample correlation of independent data
