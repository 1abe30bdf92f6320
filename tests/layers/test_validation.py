"""The validation layer (securefl/layers/validation.py): every uplink checked against the declared schema on both
sides of the wire, and every hosted participant's data before round 1.

What is tested elsewhere: NaN, Inf, a wrong shape or an integer dtype, withheld by an honest owner or rejected by
the server after a re-signing attacker (reliability/test_faults.py); stale and duplicated uplinks in a run
(reliability/test_faults.py); each kind of broken data, one message each (reliability/test_bad_data.py); random
messages through whole stacks (reliability/test_fuzz.py).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from securefl.core.message import AGGREGATOR, Message
from securefl.core.party import DataView, Party
from securefl.core.sealed import SealedTensor
from securefl.data.datasets import DataError
from securefl.layers.base import Rejected
from securefl.layers.validation import WITHHELD, ValidationLayer
from securefl.protocols.base import Field, Schema
from securefl.protocols.heterofl import UplinkKinds
from securefl.runtime.federation import build_world
from tests.conftest import tiny_config

IDS = ["p0", "p1", "p2"]


class Declared:
    """A protocol with two uplink kinds (as HeteroFL's): weights of a declared shape, and sums of any shape."""

    name = "declared"
    ctx = None  # no data to check: these tests are about messages
    uplink = UplinkKinds(Schema("update", weights=Field(aggregatable=True)), Schema("stats", sums=Field(aggregatable=True)))

    def expected_uplink_shape(self, kind: str, field: str, sender: str, rnd: int) -> tuple[int, ...] | None:
        return (3, 4) if field == "weights" else None


def _layer(rnd: int = 2) -> ValidationLayer:
    layer = ValidationLayer()
    layer.check(Declared(), [])
    layer.start_round(rnd, IDS)
    return layer


def _update(sender: str = "p0", rnd: int = 2, receiver: str = AGGREGATOR, **payload: Any) -> Message:
    return Message(sender=sender, receiver=receiver, run_id="v", round=rnd, kind="update",
                   payload=payload or {"weights": torch.randn(3, 4)}, meta={"label_split": [0, 3]})


def _sealed(dtype: str = "float32", shape: tuple[int, ...] = (3, 4)) -> Message:
    sealed = SealedTensor(chunks=(b"\x00" * 96,), length=12, shape=shape, scheme="secagg", dtype=dtype)
    return sealed.attach(_update(), "weights")


# ----- the server's checks ------------------------------------------------------------------------------------------
def test_a_well_formed_uplink_of_each_kind_is_accepted_unchanged() -> None:
    layer = _layer()
    update, sealed = _update(), _sealed()
    stats = Message(sender="p1", receiver=AGGREGATOR, run_id="v", round=2, kind="stats",
                    payload={"sums": torch.randn(7, 3)})  # no declared shape: any shape
    assert layer.server_inbound(update) is update and layer.server_inbound(stats) is stats
    assert layer.server_inbound(sealed.model_copy(update={"sender": "p2"})).sender == "p2"


REJECTED: list[tuple[str, Callable[[], Message], str]] = [
    ("not-sampled", lambda: _update(sender="p9"), "'p9' is not a participant sampled in round 2"),
    ("stale", lambda: _update(rnd=1), "stale: round 1 received during round 2"),
    ("early", lambda: _update(rnd=3), "early: round 3 received during round 2"),
    ("undeclared-kind", lambda: _update().model_copy(update={"kind": "gossip"}),
     "kind 'gossip' is not a declared uplink kind (declared: ['stats', 'update'])"),
    ("extra-field", lambda: _update(weights=torch.randn(3, 4), extra=torch.randn(2)),
     "payload fields ['extra', 'weights'] do not match the declared 'update' fields ['weights']"),
    ("fields-of-the-other-kind", lambda: _update(sums=torch.randn(2)),
     "payload fields ['sums'] do not match the declared 'update' fields ['weights']"),
    ("sparse", lambda: _update(weights=torch.randn(3, 4).to_sparse()),
     "field 'weights': a torch.sparse_coo tensor; a dense tensor is expected"),
    ("bytes", lambda: _update(weights=b"\x00" * 48), "field 'weights': bytes, not a tensor or a sealed value"),
    ("sealed-integers", lambda: _sealed(dtype="int64"),
     "field 'weights': sealed dtype int64; a floating-point tensor is expected"),
    ("sealed-shape", lambda: _sealed(shape=(4, 3)), "field 'weights': sealed shape (4, 3), expected (3, 4)"),
    ("sealed-malformed", lambda: _sealed().with_meta(**{"sealed.weights": {"scheme": "secagg", "length": 12}}),
     "field 'weights': malformed sealed value (malformed sealed field 'weights' in message 'update' from 'p0': "),
]


@pytest.mark.parametrize(("msg", "reason"), [(m, r) for _, m, r in REJECTED], ids=[n for n, _, _ in REJECTED])
def test_the_server_rejects_what_the_schema_does_not_declare(msg: Callable[[], Message], reason: str) -> None:
    with pytest.raises(Rejected) as info:
        _layer().server_inbound(msg())
    assert info.value.reason.startswith(reason), info.value.reason
    assert info.value.sender == msg().sender


def test_each_sender_counts_once_per_kind_and_round() -> None:
    layer = _layer()
    layer.server_inbound(_update())
    with pytest.raises(Rejected, match="duplicate: a second 'update' message from 'p0' in round 2"):
        layer.server_inbound(_update())
    # Another kind from the same sender is not a duplicate, and a rejected message does not count as seen.
    layer.server_inbound(Message(sender="p0", receiver=AGGREGATOR, run_id="v", round=2, kind="stats",
                                 payload={"sums": torch.ones(2)}))
    with pytest.raises(Rejected, match="NaN"):
        layer.server_inbound(_update(sender="p1", weights=torch.full((3, 4), float("nan"))))
    layer.server_inbound(_update(sender="p1"))
    # The next round starts afresh.
    layer.start_round(3, IDS)
    layer.server_inbound(_update(rnd=3))


# ----- the sender's own check ----------------------------------------------------------------------------------------
def test_an_owner_withholds_what_its_own_check_fails_and_releases_nothing_of_it() -> None:
    layer = _layer()
    broken = _update(weights=[b"\x00" * 48])  # e.g. a protocol that sealed its own payload: nothing is sealed yet
    notice = layer.outbound(broken, SimpleNamespace(id="p0"))
    assert notice.payload == {}
    assert notice.meta == {WITHHELD: "p0's own check: field 'weights': list, not a tensor"}  # the label split too
    assert (notice.sender, notice.receiver, notice.round, notice.kind) == ("p0", AGGREGATOR, 2, "update")
    # A notice is passed on as it is, and so is what the schema does not cover (e.g. a downlink-like message).
    assert layer.outbound(notice, SimpleNamespace(id="p0")) is notice
    other = _update().model_copy(update={"kind": "consensus", "payload": {"x": torch.full((1,), float("nan"))}})
    assert layer.outbound(other, SimpleNamespace(id="p0")) is other
    good = _update()
    assert layer.outbound(good, SimpleNamespace(id="p0")) is good


# ----- the receiving participant's checks ---------------------------------------------------------------------------
def test_a_peer_uplink_gets_the_servers_payload_checks_and_every_message_the_round_check() -> None:
    layer, me = _layer(), SimpleNamespace(id="p2")
    peer = _update(sender="p1", receiver="p2")
    assert layer.inbound(peer, me) is peer
    with pytest.raises(Rejected, match=r"^message from 'p1' rejected: field 'weights': shape \(4, 3\), expected"):
        layer.inbound(_update(sender="p1", receiver="p2", weights=torch.randn(4, 3)), me)
    # A downlink is not an uplink kind: its payload is the protocol's to read, but it must be of this round.
    downlink = Message(sender=AGGREGATOR, receiver="p2", run_id="v", round=2, kind="consensus",
                       payload={"anything": torch.full((5,), float("inf"))})
    assert layer.inbound(downlink, me) is downlink
    with pytest.raises(Rejected, match="stale: round 1 received during round 2"):
        layer.inbound(downlink.model_copy(update={"round": 1}), me)


# ----- the data, before round 1 ------------------------------------------------------------------------------------------
def _with_nan_features(party: Party) -> None:
    x = party.train.x_all.clone()
    x[party.train.idx[0], 0, 0, 0] = float("nan")
    party.train = DataView(x, party.train.y_all, party.train.idx)


@pytest.mark.parametrize(("check_data", "hosted", "refused"), [
    (True, None, True),  # a simulation holds every participant's data
    (True, ["p1"], True),  # p1's own node
    (True, ["p0", "p2"], False),  # a node that does not hold p1's data cannot check it
    (False, None, False),  # a coordinator holds nobody's data
], ids=["simulation", "p1s-node", "other-nodes", "coordinator"])
def test_the_data_checked_before_round_one_is_the_data_this_side_holds(check_data: bool, hosted: list[str] | None,
                                                                       refused: bool) -> None:
    _, _, _, parties, protocol = build_world(tiny_config(), "v")
    _with_nan_features(parties[1])
    layer = ValidationLayer(check_data=check_data, hosted=hosted)
    if refused:
        with pytest.raises(DataError, match="^participant 'p1': 1 training feature values are NaN or Inf$"):
            layer.check(protocol, parties)
    else:
        layer.check(protocol, parties)
