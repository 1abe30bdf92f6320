"""Finding 8 of issue 19, as the attacker: a coordinator gets an aggregate of fewer than t contributors opened.

Each test plays the coordinator against participants' layers built from the config they accepted (the same
``build_layers`` / ``for_node`` paths a run uses):

- under CKKS it hands a participant one owner's upload, or a "sum" of one contributor, to decrypt;
- under masking it lists only the victim and a colluder as the round's sampled participants, so the "sum" it
  unmasks is the victim's payload plus the colluder's known one;
- it lists more participants than the config samples, which would shrink every distributed-noise share;
- it relies on masking's threshold (round(0.67·n)) being lower than the cohort DP books (ceil(0.67·n));
- a participant that subtracts its own share from the sum faces only t-1 shares of noise, less than booked;
- with participation 0.2 of 5 (the catch-up log of the finding), every CKKS "aggregate" holds one contributor.

Limit (finding 14): under CKKS the contributor list is the coordinator's signed word, not a proof; these tests
show the check against an honest-but-curious coordinator or a bug, not against one that forges the list.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from securefl.core.message import AGGREGATOR, Message
from securefl.core.sealed import SealedTensor
from securefl.crypto.errors import SecAggAbort
from securefl.crypto.masking import MaskingClient, MaskingSession
from securefl.layers.base import Rejected
from securefl.layers.masking_aggregator import MaskingAggregator
from securefl.layers.secure_aggregation import KIND_INVITE, MaskingNodeLayer
from securefl.layers.stack import build_layers
from securefl.runtime.federation import Federation
from tests.conftest import tiny_config

RUN = "run-under-attack"
IDS = [f"p{i}" for i in range(5)]
FAKE_PROTOCOL = SimpleNamespace(name="fake", uplink=SimpleNamespace(
    fields={"x": SimpleNamespace(private=True, aggregatable=True)}))


def five(**changes: Any) -> Any:
    """Five participants, all sampled every round: n = 5, and t = ceil(0.67·5) = 4 (round(3.35) would be 3)."""
    changes["run"] = {"rounds": 1, **changes.get("run", {})}
    return tiny_config(participants=[{"id": pid, "model": "mlp_s"} for pid in IDS], signing=False, **changes)


def upload(pid: str, value: torch.Tensor) -> Message:
    return Message(sender=pid, receiver=AGGREGATOR, run_id=RUN, round=1, kind="update", payload={"x": value})


def downlink(receiver: str, sealed: SealedTensor) -> Message:
    return sealed.attach(Message(sender=AGGREGATOR, receiver=receiver, run_id=RUN, round=1, kind="result"), "x")


@pytest.fixture
def ckks(tmp_path: Path) -> Any:
    layers = build_layers(five(secure_aggregation="ckks"), side="simulation", run_id=RUN, key_dir=tmp_path / "keys",
                          party_ids=IDS, signers={})
    layer = next(layer for layer in layers if layer.name == "ckks")
    layer.check(FAKE_PROTOCOL, [])
    layer.start_round(1, IDS)
    return layer


def opened_or_refused(layer: Any, msg: Message, secret: torch.Tensor) -> str:
    """The refusal's reason; the test fails if the participant decrypted the value."""
    try:
        opened = layer.inbound(msg, SimpleNamespace(id=msg.receiver))
    except Rejected as exc:
        return exc.reason
    value = opened.tensor("x")
    pytest.fail(f"{msg.receiver} decrypted it: {value[:3].tolist()} (the victim's payload {secret[:3].tolist()}, "
                f"max error {float((value - secret).abs().max()):.1e})")


def test_a_participant_refuses_to_decrypt_one_owners_upload_forwarded_by_the_coordinator(ckks: Any) -> None:
    secret = torch.randn(16, dtype=torch.float64)
    sealed = SealedTensor.from_message(ckks.outbound(upload("p0", secret), SimpleNamespace(id="p0")), "x")
    reason = opened_or_refused(ckks, downlink("p1", sealed), secret)
    assert "contributor" in reason


def test_a_participant_refuses_to_decrypt_a_sum_of_one_contributor(ckks: Any) -> None:
    secret = torch.randn(16, dtype=torch.float64)
    reply = ckks.outbound(upload("p0", secret), SimpleNamespace(id="p0"))
    alone = ckks.wrap_aggregator(None, 1).mean([reply], "x")  # the catch-up log's "sum" at participation 0.2
    reason = opened_or_refused(ckks, downlink("p1", alone), secret)
    assert "1 contributor" in reason and "t = 4" in reason


def test_a_participant_refuses_a_sum_below_the_cohort_and_opens_one_of_t(ckks: Any) -> None:
    values = {pid: torch.randn(16, dtype=torch.float64) for pid in IDS}
    replies = [ckks.outbound(upload(pid, values[pid]), SimpleNamespace(id=pid)) for pid in IDS]
    three = ckks.wrap_aggregator(None, 1).sum(replies[:3], "x")  # t - 1 contributors: the coordinator's own pick
    reason = opened_or_refused(ckks, downlink("p4", three), sum(values[pid] for pid in IDS[:3]))
    assert "3 contributor" in reason
    four = ckks.wrap_aggregator(None, 1).sum(replies[:4], "x")
    total = ckks.inbound(downlink("p4", four), SimpleNamespace(id="p4")).tensor("x")
    assert torch.allclose(total, sum(values[pid] for pid in IDS[:4]), atol=1e-3)


def test_participation_that_samples_one_owner_a_round_is_refused_under_ckks() -> None:
    """The finding's catch-up log: HeteroFL with participation 0.2 of 5 makes every aggregate one owner's."""
    from securefl.config import ConfigError

    try:
        five(secure_aggregation="ckks", protocol="heterofl", run={"rounds": 2, "participation": 0.2})
    except ConfigError as exc:
        assert "run.participation" in str(exc)
        return
    pytest.fail("a CKKS run that samples 1 participant a round was accepted: every update is one owner's")


def masked_attack(tmp_path: Path, sampled: list[str]) -> torch.Tensor:
    """The coordinator runs SecAgg with the victim p0's node and a colluder it controls, and unmasks."""
    victim = MaskingNodeLayer.for_node(five(secure_aggregation="masking"), run_id=RUN, participant_id="p0",
                                       key_dir=tmp_path / "p0")
    victim.check(FAKE_PROTOCOL, [])
    victim.start_round(1, sampled)
    session = MaskingSession(run_id=RUN, round=1, participant_ids=sampled, threshold=2)
    colluder = MaskingClient(session, "p1")
    server = MaskingAggregator(session)
    advert = victim.answer(session.message(sender=AGGREGATOR, receiver="p0", kind=KIND_INVITE, payload={}))
    roster = server.collect_advertisements([advert, colluder.advertise_keys()])
    inboxes = server.route_shares([victim.answer(roster), colluder.share_keys(roster)])
    victim.answer(inboxes["p0"])
    colluder.receive_shares(inboxes["p1"])
    secret = torch.randn(16, dtype=torch.float64)
    zeros = colluder.mask_input(torch.zeros(16, dtype=torch.float64), field="x")
    mine = zeros.attach(Message(sender="p1", receiver=AGGREGATOR, run_id=RUN, round=1, kind="update"), "x")
    theirs = victim.outbound(upload("p0", secret), SimpleNamespace(id="p0"))
    server.unmask_channel = lambda request: (victim.answer(request) if request.receiver == "p0"
                                             else colluder.unmask(request))
    total = server.sum([theirs, mine], "x")
    assert torch.allclose(total, secret, atol=1e-5)  # the colluder sent zeros: the sum is the victim's payload
    return total


def test_a_masking_node_refuses_a_round_of_the_victim_and_a_colluder(tmp_path: Path) -> None:
    """The approved config samples 5 a round (t = 4); the coordinator lists p0 and its colluder p1 only."""
    try:
        masked_attack(tmp_path, ["p0", "p1"])
    except (ValueError, SecAggAbort) as exc:
        assert "sampled" in str(exc) and "t = 4" in str(exc)
        return
    pytest.fail("the coordinator unmasked a 'sum' of the victim and its colluder: the victim's payload, exactly")


def test_participants_refuse_a_sampled_list_longer_than_the_config_samples(tmp_path: Path, ckks: Any) -> None:
    """Ten names where the config samples five: every distributed-noise share would shrink by sqrt(2), and the
    threshold would be computed for a round the config never plans."""
    inflated = [*IDS, *(f"ghost{i}" for i in range(5))]
    cfg = five(secure_aggregation="masking", privacy={"unit": "participant", "target_epsilon": 8.0,
                                                       "noise": "distributed"})
    fed = Federation(cfg, tmp_path / "run", progress=False)
    node = MaskingNodeLayer.for_node(cfg, run_id=RUN, participant_id="p0", key_dir=tmp_path / "p0")
    for layer in (fed.privacy.layer, node, ckks):
        try:
            layer.start_round(1, inflated)
        except ValueError as exc:
            assert "samples 5 per round" in str(exc)
            continue
        pytest.fail(f"{type(layer).__name__} took the coordinator's list of 10 for a round of the config's 5")
    assert fed.privacy.layer.min_survivors() == 4


@pytest.fixture
def distributed(tmp_path: Path) -> Federation:
    cfg = five(secure_aggregation="masking", privacy={"unit": "participant", "target_epsilon": 8.0,
                                                       "noise": "distributed"})
    fed = Federation(cfg, tmp_path / "run", progress=False)
    fed.privacy.layer.start_round(1, IDS)
    return fed


def test_masking_unmasks_no_sum_of_fewer_shares_than_distributed_dp_booked(distributed: Federation) -> None:
    """n = 5: DP books ceil(0.67·5) = 4 shares; a threshold of round(3.35) = 3 would unmask a sum of 3."""
    masking = next(layer for layer in distributed.layers if layer.name == "masking")
    masking.start_round(1, IDS)
    t = distributed.privacy.layer.min_survivors()
    assert (t, masking._session.threshold) == (4, 4), "masking would unmask a sum of fewer shares than DP booked"


def test_the_booking_covers_a_participant_that_subtracts_its_own_share(distributed: Federation) -> None:
    fed, dp = distributed, distributed.privacy.layer
    t = dp.min_survivors()
    # p1 sees the sum of t shares and subtracts its own: the noise left is the other t-1 shares, each of std
    # σ·Δ/sqrt(n). What the ledger books must not exceed that.
    booked: list[Any] = []
    dp.commit = lambda pid, event: booked.append(event)
    party = next(p for p in fed.parties if p.id == "p0")
    logits = torch.zeros(8, 10)
    dp.outbound(Message(sender="p0", receiver=AGGREGATOR, run_id=fed.run_id, round=1, kind="logits",
                        payload={"logits": logits}), party)
    sigma = dp.noise_multipliers["p0"]
    faced_by_a_peer = sigma * math.sqrt((t - 1) / 5)
    assert booked[0].noise_multiplier <= faced_by_a_peer * (1 + 1e-9), (
        f"booked σ {booked[0].noise_multiplier:.4f}, but a participant that knows its own share faces "
        f"{faced_by_a_peer:.4f}")
