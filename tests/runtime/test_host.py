"""The data owners' half of a round (securefl/runtime/host.py): budget stops, the uplink schema, what leaves
a participant and when, the round the ledgers book under, and the metrics an owner keeps to itself."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from securefl.core.message import AGGREGATOR, Message
from securefl.layers.base import Layer, Rejected
from securefl.privacy.errors import BudgetExceeded
from securefl.privacy.events import PrivacyEvent
from securefl.runtime.federation import Federation
from securefl.runtime.host import ParticipantHost
from tests.conftest import tiny_config

IDS = ["p0", "p1", "p2"]
DP = {"unit": "participant", "target_epsilon": 8.0, "clip_norm": 5.0}


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    """A private FedMD simulation, built but not run: its host holds the three participants."""
    federation = Federation(tiny_config(privacy=DP), tmp_path / "run", progress=False)
    yield federation
    federation.release_run_dir()


def _start(fed: Federation, rnd: int) -> None:
    for layer in fed.layers:
        layer.start_round(rnd, IDS)


def _refused(pid: str) -> BudgetExceeded:
    return BudgetExceeded(f"{pid}: this release would spend ε = 9.1 of a budget of 8", participant=pid,
                          unit="participant", epsilon_would_be=9.1, budget=8.0, delta=1e-5)


def _consensus(fed: Federation, receiver: str, rnd: int) -> Message:
    """A downlink as the coordinator sends it (through its outbound layers: signed)."""
    msg = Message(sender=AGGREGATOR, receiver=receiver, run_id=fed.run_id, round=rnd, kind="consensus",
                  payload={"consensus": torch.zeros(100, 10)})
    for layer in fed.layers:
        msg = layer.server_outbound(msg)
    return msg


def _releases(fed: Federation, pid: str) -> list[dict[str, Any]]:
    return [e for e in fed.privacy.participants[pid].ledger.entries if e["kind"] == "release"]


class Recorder(Layer):
    """A layer that notes every message it is shown on the way out, and refuses those ``refuse`` names."""

    name = "recorder"

    def __init__(self, refuse: Any = None) -> None:
        self.seen: list[Message] = []
        self.refuse = refuse

    def outbound(self, msg: Message, party: Any) -> Message:
        self.seen.append(msg)
        if self.refuse is not None and self.refuse(msg):
            raise Rejected(party.id, "the recorder refuses it")
        return msg


# ----- a spent budget stops one participant ------------------------------------------------------------------
def test_a_budget_refused_in_a_step_stops_only_that_participant_and_names_the_round(fed: Federation) -> None:
    host, dp = fed.host, fed.privacy.layer
    real_commit = dp.commit

    def commit(pid: str, event: PrivacyEvent) -> None:
        if pid == "p1":
            raise _refused(pid)
        real_commit(pid, event)

    dp.commit = commit
    _start(fed, 2)
    report = host.step(2, {pid: [] for pid in IDS})
    expected = {"p1": "round 2: p1: this release would spend ε = 9.1 of a budget of 8"}
    assert report.stopped == expected and report.rejected == []
    assert [m.sender for m in report.outgoing] == ["p0", "p2"]
    assert fed.stopped == expected  # shared with the coordinator: p1 leaves the sampling at once
    assert all("p1" not in fed.sample(r) for r in range(3, 8))
    assert [len(_releases(fed, pid)) for pid in IDS] == [1, 0, 1]


def test_a_budget_refused_in_any_phase_names_that_phase_s_round(fed: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    host, protocol = fed.host, fed.protocol

    def refuse_for(pid: str) -> Any:
        def phase(party: Any, *args: Any) -> None:
            if party.id == pid:
                raise _refused(pid)

        return phase

    monkeypatch.setattr(protocol, "prepare_party", refuse_for("p2"))
    assert host.prepare().stopped == {"p2": "round 0: p2: this release would spend ε = 9.1 of a budget of 8"}
    monkeypatch.setattr(protocol, "client_update", refuse_for("p0"))
    _start(fed, 3)
    report = host.update(3, {"p0": [_consensus(fed, "p0", 3)], "p1": []})
    assert report.stopped == {"p0": "round 3: p0: this release would spend ε = 9.1 of a budget of 8"}
    assert set(fed.stopped) == {"p0", "p2"}


def test_a_participant_refused_midway_through_a_step_releases_nothing_of_it(fed: Federation,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Two releases in one step; the budget refuses the second: the first, booked, never leaves either.
    host, dp = fed.host, fed.privacy.layer
    real_commit, calls = dp.commit, []

    def commit(pid: str, event: PrivacyEvent) -> None:
        calls.append(pid)
        if pid == "p0" and calls.count("p0") == 2:
            raise _refused(pid)
        real_commit(pid, event)

    def two_releases(party: Any, inbox: Any, rnd: int) -> list[Message]:
        return [fed.protocol.reply(party, rnd, logits=torch.full((100, 10), float(k))) for k in (1, 2)]

    dp.commit = commit
    monkeypatch.setattr(fed.protocol, "client_step", two_releases)
    monkeypatch.setattr(fed.protocol, "expected_uplink_shape", lambda *args: (100, 10))
    _start(fed, 1)
    report = host.step(1, {"p0": [], "p1": []})
    assert sorted(m.sender for m in report.outgoing) == ["p1", "p1"]
    assert list(report.stopped) == ["p0"]
    assert len(_releases(fed, "p0")) == 1  # what was booked stays booked: never an under-count


# ----- the uplink schema ------------------------------------------------------------------------------------------
def test_an_uplink_off_the_schema_is_refused_before_any_layer_sees_it(fed: Federation,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    host, recorder = fed.host, Recorder()
    host.attach_layers([recorder, *host.layers])
    real_step = fed.protocol.client_step

    def with_labels_from_p1(party: Any, inbox: Any, rnd: int) -> Message:
        msg = real_step(party, inbox, rnd)
        return msg.with_payload(labels=torch.zeros(3)) if party.id == "p1" else msg

    monkeypatch.setattr(fed.protocol, "client_step", with_labels_from_p1)
    _start(fed, 1)
    with pytest.raises(ValueError, match=r"^'logits' message from 'p1': payload fields \['labels', 'logits'\] do not "
                                         r"match the declared schema \['logits'\]$"):
        host.step(1, {pid: [] for pid in IDS})
    assert [m.sender for m in recorder.seen] == ["p0"]  # p0 stepped first; p1's message reached no layer
    assert _releases(fed, "p1") == []


def test_a_message_a_layer_refuses_is_withheld_and_logged_and_the_rest_leave(fed: Federation) -> None:
    host = fed.host
    host.attach_layers([*host.layers, Recorder(refuse=lambda msg: msg.sender == "p2")])
    _start(fed, 1)
    report = host.step(1, {pid: [] for pid in IDS})
    assert [m.sender for m in report.outgoing] == ["p0", "p1"]
    assert report.rejected == [{"sender": "p2", "receiver": AGGREGATOR, "reason": "the recorder refuses it"}]
    assert report.stopped == {} and fed.stopped == {}  # a refused message does not stop its sender
    assert len(_releases(fed, "p2")) == 1  # booked before the refusal: it stays booked


# ----- the round the ledgers book under --------------------------------------------------------------------------
def test_enter_round_sets_the_round_every_later_booking_is_made_under(fed: Federation) -> None:
    host, privacy = fed.host, fed.privacy
    host.enter_round(4)
    assert host.current_round == 4 and privacy.round == 4
    _start(fed, 5)
    host.step(5, {"p0": []})  # a step enters its round before anything is booked
    assert [e["round"] for e in _releases(fed, "p0")] == [5]
    event = PrivacyEvent.model_validate({k: v for k, v in _releases(fed, "p0")[0].items() if k in PrivacyEvent.model_fields})
    host.update(7, {})  # so does an update, even one with nothing to apply
    privacy.commit("p0", event)
    assert [e["round"] for e in _releases(fed, "p0")] == [5, 7]


def test_an_update_reaches_only_participants_with_something_to_apply_that_have_not_stopped(
        fed: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    updated: list[str] = []
    monkeypatch.setattr(fed.protocol, "client_update", lambda party, inbox, rnd: updated.append(party.id))
    fed.stopped["p2"] = "round 1: budget spent"
    _start(fed, 1)
    fed.host.update(1, {"p0": [_consensus(fed, "p0", 1)], "p1": [], "p2": [_consensus(fed, "p2", 1)]})
    assert updated == ["p0"]


# ----- metrics an owner keeps -----------------------------------------------------------------------------------------
class Scores:
    """A protocol whose evaluation reports one public score and two that read the owner's private data."""

    owner_only_metrics = frozenset({"own_label_share_accuracy", "own_val_loss"})

    def evaluate(self, party: Any) -> dict[str, Any]:
        return {"accuracy": 0.5, "own_label_share_accuracy": 0.75, "own_val_loss": torch.tensor(1.25), "loss": 2}


@pytest.mark.parametrize("privacy", [{}, DP, {"unit": "record", "target_epsilon": 8.0}], ids=["none", "participant",
                                                                                                 "record"])
def test_owner_only_metrics_are_reported_only_from_runs_without_dp(privacy: dict[str, Any], tmp_path: Path) -> None:
    parties: Sequence[Any] = [SimpleNamespace(id=pid) for pid in IDS]
    host = ParticipantHost(config=tiny_config(privacy=privacy) if privacy else tiny_config(), out=tmp_path,
                           ctx=None, protocol=Scores(), parties=parties, keys=None, n_participants=3)  # type: ignore[arg-type]
    metrics = host.evaluate(1)
    if privacy:
        assert metrics == dict.fromkeys(IDS, {"accuracy": 0.5, "loss": 2.0})
    else:
        assert metrics == dict.fromkeys(IDS, {"accuracy": 0.5, "own_label_share_accuracy": 0.75, "own_val_loss": 1.25,
                                              "loss": 2.0})
    assert all(type(v) is float for row in metrics.values() for v in row.values())
