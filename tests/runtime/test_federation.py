"""The round loop (securefl/runtime/federation.py): sampling, delivery, the release record, the payload digest,
the evaluation set and what a refused set-up leaves behind."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import securefl.runtime.federation as federation_module
from securefl.core.message import AGGREGATOR, BROADCAST, Message
from securefl.layers.base import LayerSetupError, Rejected
from securefl.layers.signing import SigningLayer
from securefl.runtime.federation import RELEASES, Federation, RoundRecord, payload_digest
from securefl.runtime.transport import InProcessTransport
from tests.conftest import tiny_config

TEN = [f"p{i}" for i in range(10)]


@pytest.fixture(scope="module")
def ten(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    """Ten participants, three sampled a round (participation 0.3); built, never run."""
    cfg = tiny_config(participants=[{"id": pid, "model": "mlp_s"} for pid in TEN], run={"participation": 0.3})
    fed = Federation(cfg, tmp_path_factory.mktemp("ten") / "run", progress=False)
    yield fed
    fed.release_run_dir()


@pytest.fixture
def nobody_stopped(ten: Federation) -> Iterator[Federation]:
    yield ten
    ten.stopped.clear()


# ----- sampling ---------------------------------------------------------------------------------------------
def test_the_sample_is_seeded_by_the_run_seed_and_the_round(ten: Federation, tmp_path: Path) -> None:
    again = Federation(ten.config, tmp_path / "again", progress=False)
    other_seed = Federation(ten.config.model_copy(update={"run": ten.config.run.model_copy(update={"seed": 4})}),
                            tmp_path / "other", progress=False)
    rounds = range(1, 31)
    assert [ten.sample(r) for r in rounds] == [again.sample(r) for r in rounds]
    assert [ten.sample(r) for r in rounds] != [other_seed.sample(r) for r in rounds]
    assert len({tuple(ten.sample(r)) for r in rounds}) > 10  # a new draw every round, not one draw reused
    for rnd in rounds:
        sample = ten.sample(rnd)
        assert len(sample) == 3 == ten.sampled_per_round()
        assert sample == sorted(set(sample), key=TEN.index)  # distinct, in the config's order


def test_the_sample_is_uniform_over_the_participants_that_have_not_stopped(nobody_stopped: Federation) -> None:
    fed, rounds = nobody_stopped, range(1, 3001)
    counts = Counter(pid for r in rounds for pid in fed.sample(r))
    # Each participant is in 3 of 10 draws: 900 of 3000 rounds (standard deviation 25).
    assert set(counts) == set(TEN) and all(800 < n < 1000 for n in counts.values()), counts
    fed.stopped["p3"] = "round 2: budget spent"
    counts = Counter(pid for r in rounds for pid in fed.sample(r))
    assert "p3" not in counts
    # Now 3 of 9: 1000 rounds each.
    assert set(counts) == set(TEN) - {"p3"} and all(900 < n < 1100 for n in counts.values()), counts


def test_when_fewer_than_a_sample_remain_every_one_left_is_sampled(nobody_stopped: Federation) -> None:
    fed = nobody_stopped
    fed.stopped.update({pid: "budget spent" for pid in TEN if pid not in ("p2", "p7")})
    assert all(fed.sample(r) == ["p2", "p7"] for r in range(1, 6))
    fed.stopped.update({"p2": "budget spent", "p7": "budget spent"})
    assert fed.sample(1) == []  # the round loop stops here


# ----- delivery -----------------------------------------------------------------------------------------------
def _downlink(fed: Federation, receiver: str, value: float = 1.0) -> Message:
    return Message(sender=AGGREGATOR, receiver=receiver, run_id=fed.run_id, round=1, kind="consensus",
                   payload={"consensus": torch.full((2, 3), value)})


def _verified(fed: Federation, msg: Message, receiver: str) -> Message:
    signing = next(layer for layer in fed.layers if isinstance(layer, SigningLayer))
    signing.start_round(1, [])
    return signing.inbound(msg, SimpleNamespace(id=receiver))


def _inboxes(fed: Federation) -> dict[str, list[Message]]:
    return {pid: fed.transport.receive(pid) for pid in [*TEN, BROADCAST]}


def test_a_broadcast_reaches_each_sampled_participant_once_signed_for_it(ten: Federation) -> None:
    sampled = ["p1", "p4", "p8"]
    ten._deliver(_downlink(ten, BROADCAST), sampled)
    inboxes = _inboxes(ten)
    assert {pid: len(msgs) for pid, msgs in inboxes.items() if msgs} == dict.fromkeys(sampled, 1)
    for pid in sampled:
        copy = inboxes[pid][0]
        assert copy.receiver == pid and torch.equal(copy.tensor("consensus"), torch.ones(2, 3))
        _verified(ten, copy, pid)  # signed after it was addressed: its receiver accepts it
    # ... and it is that receiver's copy: another participant refuses it.
    with pytest.raises(Rejected, match="wrong receiver"):
        _verified(ten, inboxes["p1"][0], "p4")


def test_an_addressed_message_reaches_only_its_receiver(ten: Federation) -> None:
    ten._deliver(_downlink(ten, "p4"), ["p1", "p4", "p8"])
    assert {pid: len(msgs) for pid, msgs in _inboxes(ten).items() if msgs} == {"p4": 1}


def test_a_downlink_per_participant_goes_to_the_named_participant_in_order(ten: Federation) -> None:
    # A relay forwarding several messages to one participant: each arrives, in order, addressed to it.
    downlink = {"p1": [_downlink(ten, "p9", 1.0), _downlink(ten, "p9", 2.0)], "p8": _downlink(ten, "p9", 3.0)}
    ten._deliver(downlink, ["p1", "p4", "p8"])
    inboxes = _inboxes(ten)
    assert {pid: [float(m.tensor("consensus")[0, 0]) for m in msgs] for pid, msgs in inboxes.items() if msgs} == {
        "p1": [1.0, 2.0], "p8": [3.0]}
    assert all(m.receiver == pid for pid, msgs in inboxes.items() for m in msgs)


def test_no_downlink_sends_nothing(ten: Federation) -> None:
    ten._deliver(None, ["p1", "p4", "p8"])
    assert not any(_inboxes(ten).values())


# ----- the release record -------------------------------------------------------------------------------------
class SnapshotTransport(InProcessTransport):
    """Notes, as each participant's message is handed over, what ``releases.jsonl`` holds at that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.out: Path | None = None
        self.sent: list[tuple[Message, list[dict[str, Any]]]] = []

    def send(self, msg: Message) -> None:
        if msg.sender != AGGREGATOR:
            assert self.out is not None
            path = self.out / RELEASES
            lines = path.read_text().splitlines() if path.exists() else []
            self.sent.append((msg, [json.loads(line) for line in lines]))
        super().send(msg)


def test_every_release_is_on_record_before_it_is_sent(tmp_path: Path) -> None:
    transport = SnapshotTransport()
    transport.out = tmp_path / "run"
    cfg = tiny_config(run={"rounds": 2}, privacy={"unit": "participant", "target_epsilon": 8.0})
    Federation(cfg, transport.out, progress=False, transport=transport).run()
    assert len(transport.sent) == 6  # three participants, two rounds
    for msg, on_record in transport.sent:
        expected = {"round": msg.round, "sender": msg.sender, "receiver": msg.receiver, "kind": "logits",
                    "private_fields": ["logits"], "meta": sorted(msg.meta), "digest": payload_digest(msg)}
        assert expected in on_record, f"{msg.sender}'s round-{msg.round} message was sent before it was recorded"
    lines = (transport.out / RELEASES).read_text().splitlines()
    assert len(lines) == 6  # one line per message, each once


def test_without_dp_nothing_is_recorded(ten: Federation) -> None:
    ten._record_releases(1, [Message(sender="p0", receiver=AGGREGATOR, run_id=ten.run_id, round=1, kind="logits",
                                     payload={"logits": torch.zeros(2)})])
    assert not (ten.out / RELEASES).exists()


# ----- the payload digest ------------------------------------------------------------------------------------------
def _message(**payload: Any) -> Message:
    return Message(sender="p0", receiver=AGGREGATOR, run_id="r", round=1, kind="logits", payload=payload)


def test_the_digest_names_the_payload_and_nothing_else() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    base = payload_digest(_message(a=x, b=b"\x01\x02"))
    same = [
        _message(a=x.clone(), b=b"\x01\x02"),
        _message(b=b"\x01\x02", a=x),  # field order
        _message(a=x.t().contiguous().t(), b=b"\x01\x02"),  # another memory layout of the same values
        Message(sender="p2", receiver="p1", run_id="other", round=9, kind="posteriors", payload={"a": x, "b": b"\x01\x02"},
                meta={"signature": "ab"}),  # another envelope
    ]
    assert all(payload_digest(msg) == base for msg in same)


def _flip_one_bit(x: torch.Tensor) -> torch.Tensor:
    bits = x.clone().view(torch.int32)
    bits[1, 2] ^= 1
    return bits.view(torch.float32)


@pytest.mark.parametrize(
    "changed",
    [
        lambda x: _message(a=_flip_one_bit(x), b=b"\x01\x02"),
        lambda x: _message(a=x.double(), b=b"\x01\x02"),  # the same values, another dtype
        lambda x: _message(a=x.reshape(4, 3), b=b"\x01\x02"),  # the same bytes, another shape
        lambda x: _message(c=x, b=b"\x01\x02"),  # another name
        lambda x: _message(a=x, b=b"\x01\x03"),
        lambda x: _message(a=x, b=[b"\x01", b"\x02"]),  # the same bytes, cut into chunks
        lambda x: _message(a=x),
    ],
    ids=["one-bit", "dtype", "shape", "name", "bytes", "chunks", "field-dropped"],
)
def test_the_digest_changes_with_any_byte_dtype_shape_or_name(changed: Any) -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert payload_digest(changed(x)) != payload_digest(_message(a=x, b=b"\x01\x02"))


def test_chunked_bytes_are_told_apart_by_where_they_are_cut() -> None:
    assert payload_digest(_message(b=[b"ab", b"c"])) != payload_digest(_message(b=[b"a", b"bc"]))


# ----- the metrics line ------------------------------------------------------------------------------------------
def test_a_round_record_averages_only_the_accuracies_it_has() -> None:
    record = RoundRecord(round=2, sampled=["p0"], participants={"p0": {"accuracy": 0.5}, "p1": {"accuracy": 0.75},
                                                                  "p2": {"loss": 3.0}},
                         server={}, communication_bytes={}, elapsed_s=1.23456, rejected=[])
    row = record.to_json()
    assert row["mean_accuracy"] == 0.625 and row["elapsed_s"] == 1.235 and row["missing"] == []
    nothing = RoundRecord(round=0, sampled=[], participants={"p0": {}}, server={}, communication_bytes={},
                          elapsed_s=0.0, rejected=[])
    assert nothing.to_json()["mean_accuracy"] is None


# ----- the evaluation set ---------------------------------------------------------------------------------------------
class Unreadable:
    """Stands in for the test split: any use of it fails the test."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attr: str) -> Any:
        raise AssertionError(f"the test split's {self.name} was read ({attr})")

    def __getitem__(self, key: Any) -> Any:
        raise AssertionError(f"the test split's {self.name} was read")

    def __len__(self) -> int:
        raise AssertionError(f"the test split's {self.name} was read")


def test_under_a_holdout_a_whole_run_evaluates_on_held_out_records_and_never_reads_the_test_split(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_load = federation_module.load_dataset
    loaded: list[Any] = []

    def without_a_readable_test_split(*args: Any, **kwargs: Any) -> Any:
        dataset = real_load(*args, **kwargs)
        loaded.append(dataset)
        return dataclasses.replace(dataset, x_test=Unreadable("x_test"), y_test=Unreadable("y_test"))

    monkeypatch.setattr(federation_module, "load_dataset", without_a_readable_test_split)
    private = [0, 1, 2, 3, 4]
    cfg = tiny_config(protocol="local_only", run={"rounds": 1}, data={"holdout_size": 200, "private_classes": private})
    fed = Federation(cfg, tmp_path / "run", progress=False)
    fed.run()
    held = torch.as_tensor(fed.split.holdout)
    in_private = torch.isin(loaded[0].y_train[held], torch.tensor(private))
    # The held-out records of the private classes, and only those; scored over the private classes.
    assert torch.equal(fed.ctx.test_x, loaded[0].x_train[held][in_private])
    assert torch.equal(fed.ctx.test_y, loaded[0].y_train[held][in_private])
    assert 0 < len(fed.ctx.test_y) < 200 and set(fed.ctx.test_y.tolist()) == set(private)
    assert torch.equal(fed.ctx.eval_classes, torch.tensor(private))


# ----- a refused set-up ------------------------------------------------------------------------------------------------
def test_a_set_up_refused_in_a_new_directory_leaves_neither_the_directory_nor_the_keys_it_made(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    # Refused by the CKKS layer's check: by then the owners' signing keys and the committee key exist.
    cfg = tiny_config(protocol="fedavg", participants=[{"id": f"p{i}", "model": "mlp_s"} for i in range(3)],
                      secure_aggregation="ckks")
    with pytest.raises(LayerSetupError, match="server computes on the aggregate in the clear"):
        Federation(cfg, tmp_path / "run", progress=False, keys=keys)
    assert not (tmp_path / "run").exists()
    assert not keys.exists() or not any(keys.iterdir()), sorted(keys.rglob("*"))
