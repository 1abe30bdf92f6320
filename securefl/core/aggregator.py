"""The plaintext aggregator that protocols call.

Protocols aggregate only through ``aggregator.mean(replies, field)`` (or
``sum`` / ``weighted_mean``), never by stacking tensors themselves, so that a
secure aggregator (CKKS, pairwise masking) can be swapped in at the call site
without touching the protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from securefl.core.message import Message
from securefl.core.sealed import SealedTensor

# What an aggregator returns: a plaintext tensor, or a sealed one that only the participants can open (CKKS).
Aggregate = torch.Tensor | SealedTensor


@runtime_checkable
class Aggregator(Protocol):
    """The one way a protocol combines replies: plain, CKKS and pairwise masking all implement it."""

    name: str

    def sum(self, replies: Sequence[Message], field: str) -> Aggregate: ...

    def mean(self, replies: Sequence[Message], field: str) -> Aggregate: ...

    def weighted_mean(self, replies: Sequence[Message], field: str, weights: Sequence[float]) -> Aggregate: ...


class AggregationError(ValueError):
    """Replies cannot be combined (missing field, shape mismatch, bad weights)."""


def require_replies(replies: Sequence[Message], field: str) -> None:
    """Every aggregator refuses an empty round with this one error."""
    if not replies:
        raise AggregationError(f"no replies to aggregate for field {field!r}")


def require_one_shape(field: str, shapes: Sequence[tuple[str, tuple[int, ...]]]) -> None:
    """Every aggregator refuses replies of different shapes with this one error, naming the first reply's sender
    and shape and the first that differs."""
    (first, shape), *rest = shapes
    for sender, other in rest:
        if tuple(other) != tuple(shape):
            raise AggregationError(f"field {field!r} has different shapes across replies: {first!r} {tuple(shape)}, "
                                   f"{sender!r} {tuple(other)}")


class PlainAggregator:
    """Sums in the clear. The aggregator therefore sees every individual payload."""

    name = "plain"

    def sum(self, replies: Sequence[Message], field: str) -> torch.Tensor:
        return self._stack(replies, field).sum(dim=0)

    def mean(self, replies: Sequence[Message], field: str) -> torch.Tensor:
        """Unweighted mean (FedMD's consensus, FedH2L's peer average)."""
        return self._stack(replies, field).mean(dim=0)

    def weighted_mean(self, replies: Sequence[Message], field: str, weights: Sequence[float]) -> torch.Tensor:
        """Mean with public weights (e.g. sample counts in FedAvg)."""
        stacked = self._stack(replies, field)
        w = torch.as_tensor(list(weights), dtype=stacked.dtype)
        if w.shape != (len(replies),) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise AggregationError(f"weights must be {len(replies)} non-negative numbers with a positive sum")
        w = w / w.sum()
        return torch.tensordot(w, stacked, dims=1)

    @staticmethod
    def _stack(replies: Sequence[Message], field: str) -> torch.Tensor:
        require_replies(replies, field)
        tensors = [r.tensor(field) for r in replies]
        require_one_shape(field, [(r.sender, tuple(t.shape)) for r, t in zip(replies, tensors, strict=True)])
        return torch.stack([t.float() for t in tensors])
