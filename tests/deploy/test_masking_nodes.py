"""Pairwise masking between a coordinator and data owners' nodes.

The SecAgg phases (key agreement, masked inputs, unmasking) are a conversation between processes here:
every node answers from state it keeps on disk, the coordinator only relays and sums. The contract test
(``tests/protocols/contract.py``) checks that every protocol computes the simulation's metrics this way;
these tests check the dropouts, the abort below the threshold, and the promises a node must keep when
each request may reach a fresh process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from securefl.core.codec import decode
from securefl.core.message import AGGREGATOR, Message
from securefl.crypto.errors import SecAggAbort
from securefl.crypto.masking import KIND_ROSTER, KIND_UNMASK_REQUEST, _ids_to_bytes
from securefl.crypto.signing import PartyKeys
from securefl.deploy.provision import provision
from securefl.deploy.remote import isolated_participants
from securefl.layers.base import LayerSetupError, Rejected
from securefl.layers.secure_aggregation import MaskingCoordinatorLayer, MaskingNodeLayer
from securefl.runtime.federation import Federation
from tests.conftest import tiny_config

RUN = "run-under-test"
FAKE_PROTOCOL = SimpleNamespace(name="fake", uplink=SimpleNamespace(
    fields={"x": SimpleNamespace(private=True, aggregatable=True)}))


class FreshProcessNodes:
    """The coordinator layer's channel to nodes that start a new process (a new layer object) per request."""

    def __init__(self, key_root: Path, ids: list[str], *, silent: set[str] | None = None,
                 tamper: Callable[[Message], Message] | None = None) -> None:
        self.key_root, self.silent = key_root, silent if silent is not None else set()
        self.tamper = tamper  # a coordinator that rewrites what it relays
        self.keys = {pid: PartyKeys.generate(pid) for pid in ids}
        self.per_round = len(ids)  # n of the config the nodes accepted
        self.rejected: list[tuple[str, str]] = []

    def node(self, pid: str, rnd: int, sampled: list[str]) -> MaskingNodeLayer:
        layer = MaskingNodeLayer(run_id=RUN, threshold_fraction=0.5, per_round=self.per_round, participant_id=pid,
                                 key_dir=self.key_root / pid,
                                 signing_key=self.keys[pid],
                                 public_keys={q: k.public_key for q, k in self.keys.items()})
        layer.check(FAKE_PROTOCOL, [])
        layer.start_round(rnd, sampled)
        return layer

    def ask(self, rnd: int, sampled: list[str], requests: dict[str, Message]) -> dict[str, Message]:
        answers = {}
        for pid, request in requests.items():
            if pid in self.silent:
                continue
            if self.tamper is not None:
                request = self.tamper(request)
            try:
                answers[pid] = self.node(pid, rnd, sampled).answer(request)
            except (ValueError, SecAggAbort) as exc:
                self.reject(pid, str(exc))
        return answers

    def reject(self, sender: str, reason: str) -> None:
        self.rejected.append((sender, reason))


def uplink(pid: str, rnd: int, value: torch.Tensor) -> Message:
    return Message(sender=pid, receiver=AGGREGATOR, run_id=RUN, round=rnd, kind="update", payload={"x": value})


def test_a_node_keeps_its_secagg_promises_across_processes(tmp_path: Path) -> None:
    ids = ["a", "b", "c"]
    nodes = FreshProcessNodes(tmp_path, ids)
    coordinator = MaskingCoordinatorLayer(run_id=RUN, threshold_fraction=0.5)
    coordinator.check(FAKE_PROTOCOL, [])
    coordinator.connect(nodes)
    coordinator.start_round(1, ids)
    assert nodes.rejected == []

    values = {pid: torch.randn(257, dtype=torch.float64) for pid in ids}
    # c shared its keys, then went away before sending its input: a and b send theirs, each from a new process.
    replies = [coordinator.server_inbound(nodes.node(pid, 1, ids).outbound(uplink(pid, 1, values[pid]),
                                                                             SimpleNamespace(id=pid)))
               for pid in ("a", "b")]
    masked = replies[0].payload["x"]
    assert not isinstance(masked, torch.Tensor)  # what left a is masked, not its values
    # A field is never masked twice with the same keys, though each attempt is a new process.
    with pytest.raises(Rejected, match="already masked"):
        nodes.node("a", 1, ids).outbound(uplink("a", 1, values["a"]), SimpleNamespace(id="a"))
    total = coordinator.wrap_aggregator(None, 1).sum(replies, "x")
    assert torch.allclose(total, values["a"] + values["b"], atol=1e-6)  # c's pairwise masks were removed

    # a answered the unmasking for survivors {a, b}. A coordinator that now claims b dropped instead (to get
    # b's mask key and strip b's masks) is refused, though the request reaches a brand-new process.
    lie = Message(sender=AGGREGATOR, receiver="a", run_id=RUN, round=1, kind=KIND_UNMASK_REQUEST,
                  payload={"survivors": _ids_to_bytes(["a", "c"]), "dropped": _ids_to_bytes(["b"])})
    with pytest.raises(SecAggAbort, match="already answered unmasking"):
        nodes.node("a", 1, ids).answer(lie)
    # And no new input leaves a once unmasking has started, in any process.
    with pytest.raises(SecAggAbort, match="unmasking has started"):
        nodes.node("a", 1, ids).outbound(uplink("a", 1, values["a"]), SimpleNamespace(id="a"))

    # The client state is the owner's alone, and a new round deletes the old one's secrets.
    state = tmp_path / "a" / "secagg" / "a.round1.state"
    assert state.stat().st_mode & 0o077 == 0
    coordinator.start_round(2, ids)
    assert not state.exists() and (tmp_path / "a" / "secagg" / "a.round2.state").exists()


def test_the_coordinator_layer_aborts_below_the_threshold_and_names_who_failed(tmp_path: Path) -> None:
    ids = ["a", "b", "c", "d"]  # t = 3
    nodes = FreshProcessNodes(tmp_path, ids, silent={"c", "d"})
    coordinator = MaskingCoordinatorLayer(run_id=RUN, threshold_fraction=0.5)
    coordinator.check(FAKE_PROTOCOL, [])
    with pytest.raises(LayerSetupError, match="channel to the nodes"):
        coordinator.start_round(1, ids)
    coordinator.connect(nodes)
    with pytest.raises(SecAggAbort, match="only 2 participants advertised keys, below the threshold t=3"):
        coordinator.start_round(1, ids)


def test_nodes_refuse_a_roster_whose_keys_the_coordinator_substituted(tmp_path: Path) -> None:
    """A coordinator that swaps b's mask key for one of its own could strip b's pairwise masks; b's signature
    on the keys it advertised does not cover the substitute, so no node shares its keys."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from securefl.crypto.masking import _raw_public

    mine = _raw_public(X25519PrivateKey.generate().public_key())

    def substitute_b(msg: Message) -> Message:
        if msg.kind != KIND_ROSTER:
            return msg
        s_pks = list(msg.payload["s_pks"])
        s_pks[[i.decode() for i in msg.payload["ids"]].index("b")] = mine
        return msg.model_copy(update={"payload": {**msg.payload, "s_pks": s_pks}})

    ids = ["a", "b", "c"]
    nodes = FreshProcessNodes(tmp_path, ids, tamper=substitute_b)
    coordinator = MaskingCoordinatorLayer(run_id=RUN, threshold_fraction=0.5)
    coordinator.check(FAKE_PROTOCOL, [])
    coordinator.connect(nodes)
    with pytest.raises(SecAggAbort, match="only 0 participants shared their keys"):
        coordinator.start_round(1, ids)
    reasons = dict(nodes.rejected)
    assert sorted(reasons) == ids and all("not signed by 'b'" in reason for reason in reasons.values())


def fedmd_config(secure_aggregation: str) -> Any:
    # t = 2 of 3 (min_cohort(3, 0.6)), so one lost node is recovered; at the default 0.67, t = ceil(2.01) = 3.
    return tiny_config(protocol="fedmd", secure_aggregation=secure_aggregation, run={"rounds": 2},
                       masking={"threshold_fraction": 0.6})


def deployed_run(tmp_path: Path, name: str, config: Any, fail: dict[tuple[str, int], set[str]]) -> Path:
    """``config`` on isolated nodes; ``fail[(phase, round)]``: participants whose node does not answer it
    (for ``layer`` requests, ``phase`` is the SecAgg message kind)."""
    remote, nodes = isolated_participants(config, tmp_path / name / "nodes", fresh_process=True)
    provision(config, coordinator_dir=tmp_path / name / "coordinator",
              node_dirs={pid: tmp_path / name / "nodes" / pid for pid in nodes})
    deliver = remote.exchange

    def flaky(requests: dict[str, bytes]) -> dict[str, bytes]:
        keep = {}
        for pid, raw in requests.items():
            request = decode(raw)
            phase = request["phase"]
            if phase == "layer":
                from securefl.core.codec import decode_message

                phase = decode_message(request["message"]).kind
            if pid not in fail.get((phase, int(request.get("round", -1))), set()):
                keep[pid] = raw
        return dict(deliver(keep))

    remote.exchange = flaky
    Federation(config, tmp_path / name / "coordinator", progress=False, remote=remote).run()
    return tmp_path / name / "coordinator"


def rounds(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_node_lost_after_the_key_agreement_is_recovered_from_its_peers_shares(tmp_path: Path) -> None:
    """p2 shares its keys in round 1 then never sends its logits; in round 2 p1 sends its logits but does not
    answer the unmasking request. Both rounds still produce the plain sum of what arrived."""
    fail = {("step", 1): {"p2"}, ("secagg/unmask-request", 2): {"p1"}}
    masked = rounds(deployed_run(tmp_path, "masked", fedmd_config("masking"), fail))
    plain = rounds(deployed_run(tmp_path, "plain", fedmd_config("none"), {("step", 1): {"p2"}}))
    assert masked[1]["missing"] == ["p2"] and plain[1]["missing"] == ["p2"]
    assert any("did not answer" in r["reason"] for r in masked[2]["rejected"] if r["sender"] == "p1")
    # Left-over masks would turn the consensus into noise of order 2^40; recovered, it is the plain one.
    for m, p in zip(masked, plain, strict=True):
        for pid in ("p0", "p1", "p2"):
            assert m["participants"][pid]["accuracy"] == pytest.approx(p["participants"][pid]["accuracy"], abs=0.02)


def test_too_few_nodes_abort_the_round_cleanly_with_no_partial_result(tmp_path: Path) -> None:
    with pytest.raises(SecAggAbort, match="below the threshold"):
        deployed_run(tmp_path, "masked", fedmd_config("masking"), {("step", 2): {"p1", "p2"}})
    assert [r["round"] for r in rounds(tmp_path / "masked" / "coordinator")] == [0, 1]


def test_the_coordinator_holds_no_participants_secagg_secret(tmp_path: Path) -> None:
    run = deployed_run(tmp_path, "masked", fedmd_config("masking"), {})
    assert not list(run.rglob("*.state"))
    assert sorted(p.name for p in (run / "keys").glob("*.ed25519")) == ["aggregator.ed25519"]
    # The last round's secrets are still on the nodes; none of them is in any file the coordinator wrote.
    secrets = [decode(p.read_bytes())[k] for p in (tmp_path / "masked" / "nodes").rglob("*.state")
               for k in ("channel_key", "mask_key", "self_mask_seed")]
    assert len(secrets) == 9
    coordinator_files = b"".join(p.read_bytes() for p in run.rglob("*") if p.is_file())
    assert not any(secret in coordinator_files for secret in secrets)


def test_an_advertisement_with_a_malformed_signature_is_left_out_and_the_round_goes_on(tmp_path: Path) -> None:
    class GarbledSignatureFromD(FreshProcessNodes):
        def ask(self, rnd, sampled, requests):  # type: ignore[no-untyped-def]
            answers = super().ask(rnd, sampled, requests)
            if "d" in answers and answers["d"].kind == "secagg/advertise":
                answers["d"] = answers["d"].with_meta(signature="not hex")
            return answers

    ids = ["a", "b", "c", "d"]
    nodes = GarbledSignatureFromD(tmp_path, ids)
    coordinator = MaskingCoordinatorLayer(run_id=RUN, threshold_fraction=0.5)
    coordinator.check(FAKE_PROTOCOL, [])
    coordinator.connect(nodes)
    coordinator.start_round(1, ids)
    assert [pid for pid, _ in nodes.rejected] == ["d"]
    assert "hex" in nodes.rejected[0][1]
    assert coordinator.wrap_aggregator(None, 1).mask_peers == ("a", "b", "c")


class ForgedKeysFromD(FreshProcessNodes):
    """d's advertisement carries a well-formed signature by a key that is not d's provisioned one."""

    def ask(self, rnd, sampled, requests):  # type: ignore[no-untyped-def]
        answers = super().ask(rnd, sampled, requests)
        if "d" in answers and answers["d"].kind == "secagg/advertise":
            answers["d"] = PartyKeys.generate("d").sign(answers["d"].with_meta(signature=""))
        return answers


def test_an_advertisement_signed_by_the_wrong_key_is_left_out_and_the_round_goes_on(tmp_path: Path) -> None:
    ids = ["a", "b", "c", "d"]
    nodes = ForgedKeysFromD(tmp_path, ids)
    coordinator = MaskingCoordinatorLayer(run_id=RUN, threshold_fraction=0.5,
                                          public_keys={pid: k.public_key for pid, k in nodes.keys.items()})
    coordinator.check(FAKE_PROTOCOL, [])
    coordinator.connect(nodes)
    coordinator.start_round(1, ids)
    assert nodes.rejected == [("d", "secure aggregation set-up: the SecAgg keys advertised for 'd' are not "
                                    "signed by 'd'")]
    assert coordinator.wrap_aggregator(None, 1).mask_peers == ("a", "b", "c")


def test_without_the_nodes_keys_one_forged_advertisement_stops_every_honest_node(tmp_path: Path) -> None:
    """Why the coordinator checks: the honest nodes refuse a roster with d's unsigned keys in it."""
    nodes = ForgedKeysFromD(tmp_path, ["a", "b", "c", "d"])
    coordinator = MaskingCoordinatorLayer(run_id=RUN, threshold_fraction=0.5)
    coordinator.check(FAKE_PROTOCOL, [])
    coordinator.connect(nodes)
    with pytest.raises(SecAggAbort, match="shared their keys"):
        coordinator.start_round(1, ["a", "b", "c", "d"])
    assert {pid for pid, reason in nodes.rejected if "not signed by 'd'" in reason} == {"a", "b", "c", "d"}
