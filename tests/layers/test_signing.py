"""Signed messages: tampered, replayed and forged messages are rejected, logged, and the run goes on."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from securefl.core.message import AGGREGATOR, Message
from securefl.crypto.signing import PartyKeys
from securefl.runtime.federation import Federation
from tests.conftest import tiny_config
from tests.layers.faults import FaultyTransport


def _run_with(tmp_path: Path, when, fault) -> tuple[dict, list[dict]]:  # type: ignore[no-untyped-def]
    transport = FaultyTransport(when, fault)
    summary = Federation(tiny_config(run={"rounds": 2}), tmp_path / "run", progress=False, transport=transport).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert transport.injected >= 1
    return summary, [rej for row in rows for rej in row["rejected"]]


def _p1_round1_uplink(m: Message) -> bool:
    return m.sender == "p1" and m.receiver == AGGREGATOR and m.round == 1


def test_tampered_payload_is_rejected_and_the_round_goes_on(tmp_path: Path) -> None:
    def tamper(m: Message) -> list[Message]:
        logits = m.tensor("logits").clone()
        logits[0, 0] += 1.0
        return [m.with_payload(logits=logits)]

    summary, rejected = _run_with(tmp_path, _p1_round1_uplink, tamper)
    assert rejected == [{"sender": "p1", "receiver": AGGREGATOR, "reason": rejected[0]["reason"]}]
    assert "bad signature" in rejected[0]["reason"]
    assert summary["rounds"] == 2


def test_replayed_message_is_rejected(tmp_path: Path) -> None:
    _, rejected = _run_with(tmp_path, _p1_round1_uplink, lambda m: [m, m])
    assert len(rejected) == 1 and "replay" in rejected[0]["reason"]


def test_forged_signature_is_rejected(tmp_path: Path) -> None:
    impostor = PartyKeys.generate("p1")
    _, rejected = _run_with(tmp_path, _p1_round1_uplink, lambda m: [impostor.sign(m.model_copy(update={"meta": {}}))])
    assert len(rejected) == 1 and "bad signature" in rejected[0]["reason"]


def test_message_from_an_earlier_round_is_rejected_as_stale(tmp_path: Path) -> None:
    held: list[Message] = []

    def hold_then_replay(m: Message) -> list[Message]:
        if m.round == 1:
            held.append(m)
            return [m]
        return [m, *held]  # re-send p1's round-1 message during round 2

    _, rejected = _run_with(tmp_path, lambda m: m.sender == "p1" and m.receiver == AGGREGATOR, hold_then_replay)
    assert len(rejected) == 1 and "stale" in rejected[0]["reason"]


def test_unsigned_downlink_is_rejected_by_the_participant(tmp_path: Path) -> None:
    def strip(m: Message) -> list[Message]:
        return [m.model_copy(update={"meta": {}, "payload": {"consensus": torch.zeros_like(m.tensor("consensus"))}})]

    _, rejected = _run_with(tmp_path, lambda m: m.kind == "consensus" and m.receiver == "p2" and m.round == 1, strip)
    assert rejected[0]["receiver"] == "p2" and "malformed" in rejected[0]["reason"]
