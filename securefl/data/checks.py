"""Checks of one participant's data before round 1: a clear error naming the participant, never a
traceback from deep inside torch in the middle of a round.

A silo of one class, or with fewer records than the batch size, is legitimate (non-IID federated
learning is made of them) and passes. What cannot work is refused: no training records at all,
features of another shape than the dataset's (every model is built for that shape), non-finite
features, non-integer labels, or labels outside the configured classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from securefl.data.datasets import DataError


def check_party_data(party: Any, *, input_shape: Sequence[int], num_classes: int,
                     classes: Sequence[int] | None = None) -> None:
    """Raise :class:`DataError` naming ``party.id`` and the problem, or return.

    ``classes``: the labels this participant may hold (``data.private_classes``); default all of
    ``0 .. num_classes - 1``.
    """
    who = f"participant {party.id!r}"
    if len(party.train) == 0:
        raise DataError(f"{who} has no training records (an empty split); give every participant at least one")
    allowed = sorted(set(range(num_classes)) if classes is None else {int(c) for c in classes})
    for split, view in (("training", party.train), ("validation", party.val)):
        if len(view) == 0:
            continue
        x, y = view.x, view.y
        if tuple(x.shape[1:]) != tuple(input_shape):
            raise DataError(f"{who}: {split} features have shape {tuple(x.shape[1:])} per record, but the "
                            f"dataset's (and every model's) input shape is {tuple(input_shape)}")
        if x.is_floating_point():
            bad = int((~torch.isfinite(x)).sum())
            if bad:
                raise DataError(f"{who}: {bad} {split} feature values are NaN or Inf")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise DataError(f"{who}: {split} labels have dtype {y.dtype}; integer class indices are expected")
        outside = sorted(set(torch.unique(y).tolist()) - set(allowed))
        if outside:
            raise DataError(f"{who}: {split} labels {outside[:10]} are outside the configured classes "
                            f"{_ranges(allowed)}")


def _ranges(values: Sequence[int]) -> str:
    if values and list(values) == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return str(list(values))
