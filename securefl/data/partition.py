"""Partitioners: how a pool of training records is split into non-IID silos.

All functions are pure and deterministic in their ``seed``. They return index
arrays into the dataset's training split, never copies of the data, so that a
thousand simulated participants cost a thousand index arrays, not a thousand
datasets.

- Dirichlet(alpha) over labels (Hsu, Qi & Brown 2019), the usual non-IID benchmark.
- Shards of k classes per participant (McMahan et al. 2017; HeteroFL's non-IID split).
- An explicit assignment, for natural silos (hospitals) given by the user.
- Few-shot: a handful of records of every class per participant (FedMD's own regime).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from securefl.data.datasets import DataError


@dataclass(frozen=True)
class PartySplit:
    """One participant's private records: indices into the training split."""

    train: np.ndarray
    val: np.ndarray

    @property
    def size(self) -> int:
        return len(self.train) + len(self.val)


@dataclass(frozen=True)
class FederatedSplit:
    """Who holds what: a public/alignment set and one private split per participant."""

    public: np.ndarray
    public_val: np.ndarray
    parties: tuple[PartySplit, ...]
    private_classes: tuple[int, ...]
    public_classes: tuple[int, ...]
    # Train records evaluated on in place of the test split (data.holdout_size); empty: the test split.
    holdout: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


def carve_public(labels: np.ndarray, pool: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Take a stratified public set of ``size`` records out of ``pool``; return (public, rest)."""
    if size == 0:
        return np.empty(0, dtype=np.int64), np.sort(pool)
    if size >= len(pool):
        raise DataError(f"public_size={size} must be smaller than the {len(pool)} records available")
    rng = np.random.default_rng(seed)
    public_idx = np.sort(pool[stratified_sample(labels[pool], size, rng)])
    rest = np.setdiff1d(pool, public_idx, assume_unique=False)
    return public_idx, rest


def stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of ``size`` records drawn without replacement, keeping class proportions.

    Largest-remainder allocation, so the sample has exactly ``size`` records.
    """
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts / counts.sum() * size
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take))[: size - take.sum()]:
        take[i] += 1
    picks = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c, n in zip(classes, take, strict=True)]
    return np.concatenate(picks)


def dirichlet_partition(labels: np.ndarray, pool: np.ndarray, n_parties: int, *, alpha: float, seed: int,
                        min_size: int = 2, max_tries: int = 1000) -> list[np.ndarray]:
    """Split ``pool`` so that each class is spread over parties by Dirichlet(alpha) proportions.

    Resamples until every party holds at least ``min_size`` records, as the
    usual benchmark code does, so no silo is empty.
    """
    if alpha <= 0:
        raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
    if n_parties * min_size > len(pool):
        raise DataError(f"cannot give {n_parties} participants {min_size} records each from {len(pool)} records")
    rng = np.random.default_rng(seed)
    pool_labels = labels[pool]
    classes = np.unique(pool_labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_parties)]
        for cls in classes:
            members = rng.permutation(pool[pool_labels == cls])
            proportions = rng.dirichlet(np.full(n_parties, alpha))
            cuts = (np.cumsum(proportions) * len(members)).astype(int)[:-1]
            for party, chunk in enumerate(np.split(members, cuts)):
                parts[party].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(r) for r in result) >= min_size:
            return result
    raise DataError(
        f"dirichlet alpha={alpha} left a participant with fewer than {min_size} records after {max_tries} "
        "draws; raise alpha or lower the number of participants"
    )


def shard_partition(labels: np.ndarray, pool: np.ndarray, n_parties: int, *, classes_per_party: int,
                    seed: int) -> list[np.ndarray]:
    """Sort by label, cut into ``n_parties * classes_per_party`` shards, deal shards at random.

    This is the McMahan et al. / HeteroFL "k classes per client" split; a party
    may end up with fewer than k distinct classes when two shards share one.
    """
    if classes_per_party < 1:
        raise DataError(f"classes_per_party must be >= 1, got {classes_per_party}")
    n_shards = n_parties * classes_per_party
    if n_shards > len(pool):
        raise DataError(f"{n_shards} shards requested from only {len(pool)} records")
    rng = np.random.default_rng(seed)
    # Shuffle first so ties within a class are broken by the seed, then stable-sort by label.
    shuffled = rng.permutation(pool)
    ordered = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(ordered, n_shards)
    order = rng.permutation(n_shards)
    return [
        np.sort(np.concatenate([shards[s] for s in order[p * classes_per_party:(p + 1) * classes_per_party]]))
        for p in range(n_parties)
    ]


def few_shot_partition(labels: np.ndarray, pool: np.ndarray, n_parties: int, *, per_class: int,
                       seed: int) -> list[np.ndarray]:
    """``per_class`` records of every class in ``pool`` for each participant, disjoint, drawn at random.

    FedMD's own setting: every owner holds every private class, but only a handful of labelled records of each.
    """
    if per_class < 1:
        raise DataError(f"few_shot per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    pool_labels = labels[pool]
    parts: list[list[np.ndarray]] = [[] for _ in range(n_parties)]
    for cls in np.unique(pool_labels):
        members = rng.permutation(pool[pool_labels == cls])
        if len(members) < n_parties * per_class:
            raise DataError(f"few_shot: class {int(cls)} has {len(members)} records, fewer than {n_parties} "
                            f"participants x per_class {per_class}")
        for party in range(n_parties):
            parts[party].append(members[party * per_class:(party + 1) * per_class])
    return [np.sort(np.concatenate(p)) for p in parts]


def explicit_partition(pool: np.ndarray, assignment: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Use the user's own silos: ``assignment[p]`` lists participant p's training indices."""
    allowed = set(pool.tolist())
    seen: set[int] = set()
    result = []
    for party, indices in enumerate(assignment):
        arr = np.asarray(indices, dtype=np.int64)
        if len(arr) == 0:
            raise DataError(f"explicit assignment: participant {party} has no records")
        bad = [int(i) for i in arr if int(i) not in allowed]
        if bad:
            raise DataError(
                f"explicit assignment: participant {party} lists indices outside the private pool "
                f"(e.g. {bad[:3]}); indices must be training records not in the public set, of a class in "
                "data.private_classes (when set), and within data.max_train_records (when set)"
            )
        overlap = seen.intersection(arr.tolist())
        if overlap:
            raise DataError(f"explicit assignment: participant {party} shares records with another "
                            f"(e.g. {sorted(overlap)[:3]})")
        seen.update(arr.tolist())
        result.append(np.sort(arr))
    return result


def train_val_split(indices: np.ndarray, val_fraction: float, seed: int) -> PartySplit:
    """Hold out a validation split for early stopping. Test data is never used to select models."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(indices)
    n_val = int(round(len(indices) * val_fraction))
    if val_fraction > 0 and len(indices) >= 5:
        n_val = max(1, n_val)
    else:
        n_val = 0
    return PartySplit(train=np.sort(shuffled[n_val:]), val=np.sort(shuffled[:n_val]))
