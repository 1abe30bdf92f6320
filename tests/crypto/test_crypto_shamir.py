"""Shamir secret sharing over GF(2^127 - 1)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefl.crypto.errors import ShamirError
from securefl.crypto.shamir import PRIME, Share, reconstruct, split


@st.composite
def sharing(draw):
    secret = draw(st.binary(min_size=1, max_size=70))
    n = draw(st.integers(min_value=1, max_value=10))
    t = draw(st.integers(min_value=1, max_value=n))
    xs = draw(st.lists(st.integers(min_value=1, max_value=0xFFFF), min_size=n, max_size=n, unique=True))
    subset = draw(st.lists(st.sampled_from(range(n)), min_size=t, max_size=n, unique=True))
    return secret, t, xs, subset


@settings(max_examples=60, deadline=None)
@given(sharing())
def test_any_t_subset_reconstructs(case) -> None:
    secret, t, xs, subset = case
    shares = split(secret, threshold=t, xs=xs)
    assert reconstruct([shares[i] for i in subset]) == secret
    wire = [Share.from_bytes(shares[i].to_bytes()) for i in subset]
    assert reconstruct(wire) == secret


def test_every_subset_of_a_32_byte_key_reconstructs() -> None:
    secret = bytes(range(32))
    shares = split(secret, threshold=3, xs=range(1, 6))
    for subset in itertools.combinations(shares, 3):
        assert reconstruct(list(subset)) == secret


def test_fewer_than_t_shares_fail() -> None:
    shares = split(b"top secret", threshold=4, xs=range(1, 8))
    with pytest.raises(ShamirError, match="3 shares given, the threshold is 4"):
        reconstruct(shares[:3])


def test_shares_below_threshold_are_independent_of_the_secret() -> None:
    # With t = 2, a single share's value is a uniformly random field element: two
    # sharings of the same secret give different shares, and shares are not the secret.
    a = split(b"\x01" * 15, threshold=2, xs=[1, 2])
    b = split(b"\x01" * 15, threshold=2, xs=[1, 2])
    assert a[0].ys != b[0].ys
    assert all(0 <= y < PRIME for y in a[0].ys)


def test_a_corrupted_extra_share_is_detected() -> None:
    shares = split(b"secret key bytes", threshold=2, xs=[1, 2, 3])
    bad = Share(x=3, ys=((shares[2].ys[0] + 1) % PRIME, *shares[2].ys[1:]), threshold=2, secret_length=16)
    with pytest.raises(ShamirError, match="x=3 is inconsistent"):
        reconstruct([shares[0], shares[1], bad])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"secret": b"", "threshold": 1, "xs": [1]}, "non-empty"),
        ({"secret": b"s", "threshold": 3, "xs": [1, 2]}, "threshold must be in [1, 2]"),
        ({"secret": b"s", "threshold": 1, "xs": [1, 1]}, "distinct"),
        ({"secret": b"s", "threshold": 1, "xs": [0, 1]}, "[1, 65535]"),
    ],
)
def test_split_validates(kwargs, needle) -> None:
    with pytest.raises(ShamirError) as info:
        split(**kwargs)
    assert needle in str(info.value)


def test_share_parsing_validates() -> None:
    share = split(b"abc", threshold=1, xs=[1])[0]
    with pytest.raises(ShamirError, match="body has"):
        Share.from_bytes(share.to_bytes()[:-1])
    with pytest.raises(ShamirError, match="shorter"):
        Share.from_bytes(b"\x01")
    with pytest.raises(ShamirError, match="duplicate"):
        reconstruct([share, share])
