"""Participant-level DP as a layer (securefl/layers/privacy.py): what is noised, how much, what is booked and
when, one release per plaintext and round, and the minimum cohort the server must respect.

What is tested elsewhere: the refusals of unsafe protocols (test_privacy_releases.py), noise that a
coordinator cannot regenerate (adversary/test_secret_dp_randomness.py), a coordinator's inflated list and the
booking against a participant that knows its own share (adversary/test_minimum_cohort.py).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from securefl.core.aggregator import PlainAggregator
from securefl.core.message import AGGREGATOR, Message
from securefl.layers.privacy import ParticipantDPLayer, TooFewContributors
from securefl.privacy.cohort import Cohort
from securefl.privacy.errors import BudgetExceeded
from securefl.privacy.events import PrivacyEvent
from securefl.protocols.base import Field, Schema

IDS = ["p0", "p1", "p2", "p3"]
SIGMA, CLIP = 0.5, 1.0
PROTOCOL = SimpleNamespace(name="stand_in", uplink=Schema("logits", logits=Field(aggregatable=True),
                                                          public=Field(aggregatable=True, private=False)))


class Booked(list[tuple[str, PrivacyEvent]]):
    """The commit a privacy runtime gives the layer, recording instead of writing a ledger."""

    refuse: set[str]

    def __init__(self) -> None:
        super().__init__()
        self.refuse = set()

    def __call__(self, pid: str, event: PrivacyEvent) -> None:
        if pid in self.refuse:
            raise BudgetExceeded(f"{pid}: over budget", participant=pid, unit="participant", epsilon_would_be=9.0,
                                 budget=8.0, delta=1e-5)
        self.append((pid, event))


def _layer(mode: str = "local", *, cohort: Cohort | None = None, sampled: list[str] | None = None,
           ) -> tuple[ParticipantDPLayer, Booked]:
    booked = Booked()
    layer = ParticipantDPLayer(noise_multipliers={pid: SIGMA for pid in IDS[:3]}, clip_norm=CLIP, mode=mode,
                               commit=booked, min_contributors=0.67)
    if cohort is not None:
        layer.plan_cohort(cohort)
    layer.check(PROTOCOL, [])
    layer.start_round(1, sampled or IDS)
    return layer, booked


def _message(logits: torch.Tensor, *, sender: str = "p0", receiver: str = AGGREGATOR, rnd: int = 1,
             **payload: torch.Tensor) -> Message:
    return Message(sender=sender, receiver=receiver, run_id="dp", round=rnd, kind="logits",
                   payload={"logits": logits, **payload})


def _party(pid: str = "p0") -> Any:
    return SimpleNamespace(id=pid)


# ----- one release per plaintext, per round --------------------------------------------------------------------
def test_the_same_plaintext_to_several_receivers_is_one_release() -> None:
    layer, booked = _layer()
    logits = torch.randn(6, 10)
    copies = [layer.outbound(_message(logits, receiver=peer), _party()) for peer in ("p1", "p2", "p3")]
    assert len(booked) == 1  # booked once
    assert all(torch.equal(c.tensor("logits"), copies[0].tensor("logits")) for c in copies)  # noised once
    other = layer.outbound(_message(logits + 1, receiver="p1"), _party())
    assert len(booked) == 2 and not torch.equal(other.tensor("logits"), copies[0].tensor("logits"))


def test_the_next_round_releases_the_same_plaintext_anew() -> None:
    layer, booked = _layer()
    logits = torch.randn(6, 10)
    first = layer.outbound(_message(logits), _party())
    layer.start_round(2, IDS)
    again = layer.outbound(_message(logits, rnd=2), _party())
    assert len(booked) == 2 and not torch.equal(first.tensor("logits"), again.tensor("logits"))


def test_a_refused_booking_lets_nothing_out_and_remembers_nothing() -> None:
    layer, booked = _layer()
    booked.refuse.add("p0")
    logits = torch.randn(6, 10)
    with pytest.raises(BudgetExceeded):
        layer.outbound(_message(logits), _party())
    booked.refuse.clear()
    # Had the refused release been cached, this would go out for free, unbooked.
    layer.outbound(_message(logits), _party())
    assert [pid for pid, _ in booked] == ["p0"]


# ----- what is noised, and what is not ------------------------------------------------------------------------------
def test_only_the_declared_private_fields_of_a_hosted_participant_are_noised() -> None:
    layer, booked = _layer()
    logits, public = torch.randn(6, 10, dtype=torch.float64), torch.randn(3)
    out = layer.outbound(_message(logits, public=public), _party())
    assert out.tensor("logits").dtype == torch.float64 and not torch.equal(out.tensor("logits"), logits)
    assert out.tensor("public") is public
    # p3 is not hosted by this layer (no σ of its own here), and a message without the private field is no release.
    for msg, pid in ((_message(logits, sender="p3"), "p3"),
                     (Message(sender="p0", receiver=AGGREGATOR, run_id="dp", round=1, kind="logits",
                              payload={"public": public}), "p0")):
        assert layer.outbound(msg, _party(pid)) is msg
    assert len(booked) == 1


def test_a_protocol_without_an_uplink_has_nothing_noised() -> None:
    layer, booked = _layer()
    layer.check(SimpleNamespace(name="local_only", uplink=None), [])
    msg = _message(torch.randn(6, 10))
    assert layer.outbound(msg, _party()) is msg and booked == []


def _noise_std(layer: ParticipantDPLayer) -> float:
    # Zeros are inside the clipping ball, so what comes out is the noise alone.
    return float(layer.outbound(_message(torch.zeros(200, 100)), _party()).tensor("logits").std())


def test_local_noise_is_sigma_times_2c_and_is_booked_so() -> None:
    layer, booked = _layer("local")
    assert _noise_std(layer) == pytest.approx(SIGMA * 2 * CLIP, rel=0.05)
    (pid, event), = booked
    assert (pid, event.noise_multiplier, event.sensitivity, event.relation, event.payload) == (
        "p0", SIGMA, 2 * CLIP, "replace_one", "logits")


def test_a_clipped_release_stays_within_reach_of_its_clipping_ball() -> None:
    layer, _ = _layer("local")
    out = layer.outbound(_message(torch.full((200, 100), 50.0)), _party()).tensor("logits")
    # Clipped to norm C = 1 (each of the 20000 values 1/sqrt(20000)), then noised with std 1: the mean is the clipped
    # value's, not 50.
    assert float(out.mean()) == pytest.approx(1 / math.sqrt(20_000), abs=0.03)


@pytest.mark.parametrize("planned", [True, False], ids=["n-from-the-config", "n-from-the-round"])
def test_distributed_shares_and_their_booking_use_n_and_t_of_the_cohort(planned: bool) -> None:
    # The config samples 4 a round (t = 3); this round's list has 3 (one participant stopped).
    cohort = Cohort.plan(per_round=4, fraction=0.67, participants=IDS) if planned else None
    layer, booked = _layer("distributed", cohort=cohort, sampled=["p0", "p1", "p2"])
    n, t = (4, 3) if planned else (3, 3)  # without a plan, n is the list's length and t its minimum cohort
    assert layer.min_survivors() == t
    assert _noise_std(layer) == pytest.approx(SIGMA * 2 * CLIP / math.sqrt(n), rel=0.05)
    (_, event), = booked
    assert event.noise_multiplier == pytest.approx(SIGMA * math.sqrt((t - 1) / n), rel=1e-12)


def test_a_planned_distributed_cohort_refuses_a_list_it_cannot_come_from() -> None:
    cohort = Cohort.plan(per_round=4, fraction=0.67, participants=IDS)
    with pytest.raises(ValueError, match="fewer than the minimum cohort t = 3 of 4"):
        _layer("distributed", cohort=cohort, sampled=["p0", "p1"])


# ----- the server side: the minimum cohort ----------------------------------------------------------------------------
def test_local_noise_leaves_the_aggregator_alone() -> None:
    layer, _ = _layer("local")
    aggregator = PlainAggregator()
    assert layer.wrap_aggregator(aggregator, 1) is aggregator


def _aggregate(aggregator: Any, operation: str, k: int) -> torch.Tensor:
    """``operation`` over the replies of the first ``k`` participants (weights 1, 2, 3, ...)."""
    replies = [_message(torch.full((2,), float(i + 1)), sender=IDS[i]) for i in range(k)]
    if operation == "weighted_mean":
        return aggregator.weighted_mean(replies, "logits", [float(i + 1) for i in range(k)])
    return getattr(aggregator, operation)(replies, "logits")


@pytest.mark.parametrize("operation", ["sum", "mean", "weighted_mean"])
def test_distributed_noise_aggregates_no_fewer_shares_than_were_booked(operation: str) -> None:
    layer, _ = _layer("distributed", cohort=Cohort.plan(per_round=4, fraction=0.67, participants=IDS))
    aggregator = layer.wrap_aggregator(PlainAggregator(), 1)
    with pytest.raises(TooFewContributors, match="^distributed DP: 2 contributions reached the aggregator, fewer "
                                                 "than the 3 the participants' ledgers booked noise for"):
        _aggregate(aggregator, operation, 2)
    assert torch.equal(_aggregate(aggregator, operation, 3), _aggregate(PlainAggregator(), operation, 3))
    assert aggregator.name == PlainAggregator().name  # anything else is the inner aggregator's
