"""data.holdout_size (evaluation on held-out train records) and the few-shot partition (FedMD's regime)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from securefl.config import ConfigError, parse_config
from securefl.data.datasets import DataError
from securefl.data.partition import few_shot_partition
from securefl.runtime.federation import build_world


def _raw(**data: Any) -> dict[str, Any]:
    return {"protocol": "local_only", "data": {"dataset": "digits", "public_size": 200, **data},
            "participants": [{"id": f"p{i}", "model": "mlp_s"} for i in range(3)]}


def test_holdout_replaces_the_test_split_and_is_disjoint_from_everything() -> None:
    dataset, split, ctx, _, _ = build_world(parse_config(_raw(holdout_size=300), "t"), "run")
    held = set(split.holdout.tolist())
    assert len(held) == 300
    assert not held & set(split.public.tolist())
    for party in split.parties:
        assert not held & (set(party.train.tolist()) | set(party.val.tolist()))
    # The evaluation set is those train records, not the test split.
    assert torch.equal(ctx.test_x, dataset.x_train[torch.as_tensor(split.holdout)])
    assert len(ctx.test_y) == 300 and len(ctx.test_y) != len(dataset.y_test)


def test_without_holdout_the_test_split_is_evaluated() -> None:
    dataset, split, ctx, _, _ = build_world(parse_config(_raw(), "t"), "run")
    assert len(split.holdout) == 0 and torch.equal(ctx.test_y, dataset.y_test)


def test_holdout_refused_for_owner_tables() -> None:
    raw = _raw(holdout_size=10)
    raw["data"].update(dataset="files", public_size=0,
                       files={"label_column": "y", "num_classes": 2, "test_file": "t.csv"})
    for p in raw["participants"]:
        p["data_file"] = "x.csv"
    with pytest.raises(ConfigError, match="data.holdout_size = 10"):
        parse_config(raw, "t")


def test_few_shot_gives_every_owner_every_class() -> None:
    labels = np.repeat(np.arange(5), 40)
    pool = np.arange(len(labels))
    silos = few_shot_partition(labels, pool, 4, per_class=3, seed=0)
    for silo in silos:
        assert np.array_equal(np.bincount(labels[silo], minlength=5), np.full(5, 3))
    assert len(set(np.concatenate(silos).tolist())) == 4 * 15  # disjoint


def test_few_shot_refuses_a_class_too_small() -> None:
    labels = np.repeat(np.arange(2), [40, 5])
    with pytest.raises(DataError, match="class 1 has 5 records"):
        few_shot_partition(labels, np.arange(45), 4, per_class=3, seed=0)


def test_few_shot_in_a_config() -> None:
    raw = _raw(partition={"kind": "few_shot", "per_class": 4}, val_fraction=0.25)
    _, split, _, _, _ = build_world(parse_config(raw, "t"), "run")
    assert all(p.size == 4 * 10 for p in split.parties)
