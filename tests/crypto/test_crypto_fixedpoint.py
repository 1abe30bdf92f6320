"""Fixed-point encoding into Z_{2^k}."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefl.crypto.fixedpoint import FixedPoint

FP = FixedPoint()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False), min_size=1, max_size=50))
def test_round_trip_within_half_resolution(values) -> None:
    x = np.array(values)
    back = FP.decode(FP.encode(x, n_contributors=10))
    assert np.all(np.abs(back - x) <= FP.resolution / 2)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(min_value=-(2**40), max_value=2**40), min_size=2, max_size=20),
    st.sampled_from([FixedPoint(), FixedPoint(ring_bits=64, fractional_bits=32), FixedPoint(ring_bits=32, fractional_bits=8)]),
)
def test_sums_of_representable_values_are_exact(ints, fp: FixedPoint) -> None:
    # Values k / 2^f (within the bound) survive encode -> wrap-around sum -> decode exactly.
    limit = int(fp.bound(len(ints)) * 2**fp.fractional_bits)
    ints = [max(-limit, min(limit, i)) for i in ints]
    x = np.array(ints, dtype=np.float64) / 2**fp.fractional_bits
    total = np.zeros(1, dtype=fp.dtype)
    for v in x:
        total += fp.encode(np.array([v]), n_contributors=len(ints))
    assert fp.decode(total)[0] == x.sum()


def test_negative_values_use_twos_complement() -> None:
    enc = FP.encode(np.array([-1.0]), n_contributors=1)
    assert enc.dtype == np.dtype("<u8")
    assert int(enc[0]) == 2**64 - 2**24


def test_non_finite_values_are_rejected_with_their_index() -> None:
    with pytest.raises(ValueError, match="non-finite value inf at flat index 1"):
        FP.encode(np.array([0.0, np.inf]), n_contributors=2)
    with pytest.raises(ValueError, match="non-finite value nan at flat index 0"):
        FP.encode(torch.tensor([float("nan")]), n_contributors=2)


def test_values_too_large_for_n_contributors_are_rejected() -> None:
    bound = FP.bound(10)
    assert bound == pytest.approx((2**63 - 1) / 10 / 2**24)
    FP.encode(np.array([bound * 0.999]), n_contributors=10)
    with pytest.raises(ValueError) as info:
        FP.encode(np.array([1.0, bound * 1.01]), n_contributors=10)
    text = str(info.value)
    assert "flat index 1" in text and "10 contributors" in text and f"{bound:.6g}" in text
    # The same value is fine for fewer contributors.
    FP.encode(np.array([bound * 1.01]), n_contributors=5)


def test_configuration_is_validated() -> None:
    with pytest.raises(ValueError, match="ring_bits must be 32 or 64, got 48"):
        FixedPoint(ring_bits=48)
    with pytest.raises(ValueError, match="fractional_bits must be in"):
        FixedPoint(ring_bits=32, fractional_bits=31)
