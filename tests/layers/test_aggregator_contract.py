"""The aggregator contract: plain, CKKS and pairwise masking are interchangeable behind ``Aggregator``.

A protocol aggregates only through ``sum``, ``mean`` and ``weighted_mean`` and never learns which aggregator it
was given (the layers swap it at the call site). So the three must give the same numbers, up to each scheme's
documented precision, and refuse the same bad input with the same error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from securefl.core.aggregator import AggregationError, Aggregator, PlainAggregator
from securefl.core.message import AGGREGATOR, Message
from securefl.crypto.ckks import KeyHolderContext, PublicContext, seal_tensor
from securefl.crypto.masking import MaskingSession
from securefl.layers.ckks_aggregator import CkksAggregator
from securefl.layers.masking_aggregator import SecAggSimulation

SENDERS = ["p0", "p1", "p2", "p3"]
FIELD = "logits"
# CKKS is approximate (CkksParams documents 1e-6 on a sum of unit-scale values); masking encodes in fixed point
# with 24 fractional bits, then returns float32.
TOLERANCE = {"plain": 1e-6, "ckks": 1e-5, "masking": 1e-6}  # plain: float32 rounding of the weights


def _inputs(shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.empty(shape).uniform_(-3, 3, generator=gen) for shape in shapes]


def _message(sender: str) -> Message:
    return Message(sender=sender, receiver=AGGREGATOR, run_id="contract", round=1, kind="update")


class Scheme:
    """One aggregator, the replies it expects (plaintext, sealed or masked), and how to read its result."""

    def __init__(self, name: str, key_ctx: KeyHolderContext, public_ctx: PublicContext) -> None:
        self.name, self.key_ctx, self.public_ctx = name, key_ctx, public_ctx

    def __call__(self, xs: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
                 ) -> tuple[Aggregator, list[Message], Callable[[object], torch.Tensor]]:
        senders = SENDERS[:len(xs)]
        if self.name == "plain":
            replies = [_message(s).with_payload(**{FIELD: x}) for s, x in zip(senders, xs, strict=True)]
            return PlainAggregator(), replies, lambda out: out  # type: ignore[return-value]
        if self.name == "ckks":
            replies = [seal_tensor(self.key_ctx, x).attach(_message(s), FIELD) for s, x in zip(senders, xs, strict=True)]
            return CkksAggregator(self.public_ctx), replies, lambda out: self.key_ctx.open(out)  # type: ignore[arg-type]
        # A masking session masks each field once: one fresh session per aggregation, as in a round.
        session = MaskingSession(run_id="contract", round=1, participant_ids=senders, threshold=len(senders) // 2 + 1)
        sim = SecAggSimulation.setup(session)
        replies = [sim.clients[s].mask_input(x, field=FIELD, weight=None if weights is None else weights[i])
                   .attach(_message(s), FIELD) for i, (s, x) in enumerate(zip(senders, xs, strict=True))]
        return sim.aggregator, replies, lambda out: out  # type: ignore[return-value]


@pytest.fixture(scope="module")
def contexts() -> tuple[KeyHolderContext, PublicContext]:
    key_ctx = KeyHolderContext.generate()
    return key_ctx, PublicContext.from_bytes(key_ctx.public().to_bytes())


@pytest.fixture(params=["plain", "ckks", "masking"])
def scheme(request: pytest.FixtureRequest, contexts: tuple[KeyHolderContext, PublicContext]) -> Scheme:
    return Scheme(request.param, *contexts)


def test_every_aggregator_is_an_aggregator(scheme: Scheme) -> None:
    aggregator, _, _ = scheme(_inputs([(3,)] * 2))
    assert isinstance(aggregator, Aggregator)


@pytest.mark.parametrize("operation", ["sum", "mean", "weighted_mean"])
def test_all_three_give_the_plain_result(scheme: Scheme, operation: str) -> None:
    xs = _inputs([(4, 5)] * 4)
    weights = [1.0, 2.0, 0.5, 3.0]
    expected = {"sum": torch.stack(xs).sum(0), "mean": torch.stack(xs).mean(0),
                "weighted_mean": sum(w * x for w, x in zip(weights, xs, strict=True)) / sum(weights)}[operation]
    aggregator, replies, read = scheme(xs, weights if operation == "weighted_mean" else None)
    if operation == "weighted_mean":
        out = aggregator.weighted_mean(replies, FIELD, weights)
    else:
        out = getattr(aggregator, operation)(replies, FIELD)
    got = read(out)
    assert got.shape == (4, 5)
    torch.testing.assert_close(got.double(), expected.double(), atol=TOLERANCE[scheme.name] * 4, rtol=0)


@pytest.mark.parametrize("operation", ["sum", "mean"])
def test_an_empty_round_is_the_same_error_everywhere(scheme: Scheme, operation: str) -> None:
    aggregator, _, _ = scheme(_inputs([(3,)] * 2))
    with pytest.raises(AggregationError, match=f"^no replies to aggregate for field '{FIELD}'$"):
        getattr(aggregator, operation)([], FIELD)


def test_replies_of_different_shapes_are_the_same_error_everywhere(scheme: Scheme) -> None:
    aggregator, replies, _ = scheme(_inputs([(3,), (3,), (4,)]))
    expected = f"^field '{FIELD}' has different shapes across replies: 'p0' \\(3,\\), 'p2' \\(4,\\)$"
    with pytest.raises(AggregationError, match=expected):
        aggregator.sum(replies, FIELD)
