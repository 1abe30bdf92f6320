"""Who holds what: the public set, the evaluation hold-out and each owner's private silo, from the ``data``
section and the run's seed alone (so every node derives the same split)."""

from __future__ import annotations

import numpy as np

from securefl.core.seeding import derive_seed
from securefl.data.config import DataConfig, DirichletPartition, ExplicitPartition, FewShotPartition, ShardPartition
from securefl.data.datasets import DataError, Dataset
from securefl.data.partition import (
    FederatedSplit,
    PartySplit,
    carve_public,
    dirichlet_partition,
    explicit_partition,
    few_shot_partition,
    shard_partition,
    stratified_sample,
    train_val_split,
)


def build_split(data: DataConfig, dataset: Dataset, *, seed: int, n_parties: int) -> FederatedSplit:
    """Public set and private silos, deterministic in ``seed`` (the run's)."""
    labels = dataset.y_train.numpy()
    pool = np.arange(len(labels))
    if data.max_train_records is not None and data.max_train_records < len(pool):
        pool = np.sort(stratified_sample(labels, data.max_train_records, np.random.default_rng(derive_seed(seed, "subsample"))))
    holdout = np.empty(0, dtype=np.int64)
    if data.holdout_size:
        # Held out first, so no participant and no public set ever holds an evaluation record.
        holdout, pool = carve_public(labels, pool, data.holdout_size, derive_seed(seed, "holdout"))
    all_classes = tuple(range(dataset.num_classes))
    private_classes = tuple(data.private_classes or all_classes)
    public_classes = tuple(data.public_classes or all_classes)
    for name, classes in (("private_classes", private_classes), ("public_classes", public_classes)):
        bad = [c for c in classes if c not in all_classes]
        if bad:
            raise DataError(f"data.{name} = {bad}: classes must be in 0..{dataset.num_classes - 1}")
    public_pool = pool[np.isin(labels[pool], public_classes)]
    public, _ = carve_public(labels, public_pool, data.public_size, derive_seed(seed, "public"))
    private_pool = np.setdiff1d(pool[np.isin(labels[pool], private_classes)], public)

    partition = data.partition
    if isinstance(partition, DirichletPartition):
        silos = dirichlet_partition(labels, private_pool, n_parties, alpha=partition.alpha,
                                    seed=derive_seed(seed, "partition"), min_size=partition.min_size)
    elif isinstance(partition, ShardPartition):
        silos = shard_partition(labels, private_pool, n_parties, classes_per_party=partition.classes_per_party,
                                seed=derive_seed(seed, "partition"))
    elif isinstance(partition, ExplicitPartition):
        silos = explicit_partition(private_pool, partition.assignment)
    elif isinstance(partition, FewShotPartition):
        silos = few_shot_partition(labels, private_pool, n_parties, per_class=partition.per_class,
                                   seed=derive_seed(seed, "partition"))
    else:
        shuffled = np.random.default_rng(derive_seed(seed, "partition")).permutation(private_pool)
        silos = [np.sort(s) for s in np.array_split(shuffled, n_parties)]

    parties = tuple(train_val_split(s, data.val_fraction, derive_seed(seed, "val", i)) for i, s in enumerate(silos))
    # A labelled public set gets its own validation split, for early stopping of transfer learning.
    if data.public_labelled and len(public) > 0:
        public_split = train_val_split(public, 0.1, derive_seed(seed, "public-val"))
    else:
        public_split = PartySplit(train=public, val=np.empty(0, dtype=np.int64))
    return FederatedSplit(public=public_split.train, public_val=public_split.val, parties=parties,
                          private_classes=private_classes, public_classes=public_classes, holdout=holdout)
