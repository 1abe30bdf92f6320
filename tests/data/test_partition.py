"""Partitioners: deterministic, disjoint, covering, and non-IID in the way they claim."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefl.data.datasets import DataError
from securefl.data.partition import (
    carve_public,
    dirichlet_partition,
    explicit_partition,
    shard_partition,
    train_val_split,
)

LABELS = np.repeat(np.arange(10), 100)  # 1,000 records, 100 per class
POOL = np.arange(len(LABELS))


def _assert_disjoint_cover(parts: list[np.ndarray], pool: np.ndarray) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())), "a record is in two silos"
    assert set(joined.tolist()) == set(pool.tolist()), "some records were lost"


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 12), alpha=st.sampled_from([0.1, 0.5, 1.0, 100.0]), seed=st.integers(0, 10_000))
def test_dirichlet_is_a_deterministic_disjoint_cover(n: int, alpha: float, seed: int) -> None:
    parts = dirichlet_partition(LABELS, POOL, n, alpha=alpha, seed=seed, min_size=5)
    _assert_disjoint_cover(parts, POOL)
    assert min(len(p) for p in parts) >= 5
    again = dirichlet_partition(LABELS, POOL, n, alpha=alpha, seed=seed, min_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def _mean_label_entropy(parts: list[np.ndarray]) -> float:
    ent = []
    for p in parts:
        q = np.bincount(LABELS[p], minlength=10) / len(p)
        q = q[q > 0]
        ent.append(-(q * np.log(q)).sum())
    return float(np.mean(ent))


def test_small_alpha_is_more_skewed_than_large_alpha() -> None:
    skewed = dirichlet_partition(LABELS, POOL, 10, alpha=0.1, seed=0, min_size=5)
    flat = dirichlet_partition(LABELS, POOL, 10, alpha=100.0, seed=0, min_size=5)
    assert _mean_label_entropy(skewed) < 0.6 * _mean_label_entropy(flat)
    assert _mean_label_entropy(flat) > 0.95 * np.log(10)


def test_shards_give_at_most_k_classes_each() -> None:
    parts = shard_partition(LABELS, POOL, 10, classes_per_party=2, seed=1)
    _assert_disjoint_cover(parts, POOL)
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)


def test_public_carve_out_is_stratified_and_disjoint() -> None:
    public, rest = carve_public(LABELS, POOL, 200, seed=4)
    assert len(public) == 200 and len(rest) == 800
    assert not set(public.tolist()) & set(rest.tolist())
    assert np.all(np.bincount(LABELS[public], minlength=10) == 20)


def test_explicit_assignment_is_checked() -> None:
    pool = np.arange(10, 30)
    assert [len(p) for p in explicit_partition(pool, [[10, 11], [12]])] == [2, 1]
    with pytest.raises(DataError, match="outside the private pool"):
        explicit_partition(pool, [[1, 10]])
    with pytest.raises(DataError, match="shares records"):
        explicit_partition(pool, [[10, 11], [11]])
    with pytest.raises(DataError, match="no records"):
        explicit_partition(pool, [[10], []])


def test_validation_split_is_disjoint_from_training() -> None:
    split = train_val_split(np.arange(100), 0.2, seed=5)
    assert len(split.val) == 20 and len(split.train) == 80
    assert not set(split.val.tolist()) & set(split.train.tolist())


def test_impossible_requests_fail_clearly() -> None:
    with pytest.raises(DataError, match="alpha must be > 0"):
        dirichlet_partition(LABELS, POOL, 3, alpha=0.0, seed=0)
    with pytest.raises(DataError, match="cannot give"):
        dirichlet_partition(LABELS, POOL[:10], 5, alpha=1.0, seed=0, min_size=5)
    with pytest.raises(DataError, match="public_size"):
        carve_public(LABELS, POOL[:10], 10, seed=0)
