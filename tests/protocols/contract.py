"""The contract every protocol honours. Each protocol's test file subclasses it.

A subclass sets ``protocol`` and, if needed, ``overrides`` (changes to the tiny
digits config of ``tests/conftest.py``).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from securefl.config import deep_merge
from securefl.core.aggregator import PlainAggregator
from securefl.core.message import AGGREGATOR, BROADCAST, Message
from securefl.protocols import ProtocolSetupError, get_protocol
from securefl.runtime.federation import Federation, build_world
from securefl.runtime.host import as_list
from securefl.runtime.transport import InProcessTransport
from tests.conftest import Crash, crash_after_round, metrics_without_time, tiny_config

FORBIDDEN_IMPORTS = {"opacus", "tenseal", "cryptography", "flwr", "securefl.privacy", "securefl.crypto",
                     "securefl.layers"}


class RecordingTransport(InProcessTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[Message] = []

    def send(self, msg: Message) -> None:
        self.sent.append(msg)
        super().send(msg)


class SpyAggregator(PlainAggregator):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def sum(self, replies, field):  # type: ignore[no-untyped-def]
        self.calls.append(("sum", field))
        return super().sum(replies, field)

    def mean(self, replies, field):  # type: ignore[no-untyped-def]
        self.calls.append(("mean", field))
        return super().mean(replies, field)

    def weighted_mean(self, replies, field, weights):  # type: ignore[no-untyped-def]
        self.calls.append(("weighted_mean", field))
        return super().weighted_mean(replies, field, weights)


class RateRecorder:
    """A participant's trainer that notes the learning rate of every private-data fit, then trains as before."""

    def __init__(self, inner: Any, rates: set[float]) -> None:
        self.inner, self.rates = inner, rates

    def fit(self, model: Any, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        self.rates.update(group["lr"] for group in optimizer.param_groups)
        return self.inner.fit(model, optimizer, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def addressed(messages: Any, ids: list[str]) -> dict[str, list[Message]]:
    """Inboxes from a downlink or a list of messages, as the transport would fill them (a broadcast to all)."""
    inboxes: dict[str, list[Message]] = {pid: [] for pid in ids}
    if isinstance(messages, dict):
        messages = [m.model_copy(update={"receiver": pid}) for pid, ms in messages.items() for m in as_list(ms)]
    for msg in as_list(messages):
        for pid in ids if msg.receiver == BROADCAST else [msg.receiver]:
            if pid != AGGREGATOR:
                inboxes[pid].append(msg.model_copy(update={"receiver": pid}))
    return inboxes


class ProtocolContract:
    """The fast part (one round by hand, one whole run with its messages checked) runs in ``make test``; the
    end-to-end runs (reproducibility, resume, nodes, masking between nodes) are ``integration`` tests, run by
    ``make test-integration`` and in CI."""

    protocol: ClassVar[str]
    overrides: ClassVar[dict[str, Any]] = {}
    shares_nothing: ClassVar[bool] = False  # baselines such as local-only send no messages

    def config(self, **changes: Any) -> Any:
        return tiny_config(**deep_merge({"protocol": self.protocol, **self.overrides}, changes))

    def test_one_round_by_hand_declares_its_messages_and_aggregates_only_through_the_aggregator(self) -> None:
        """The contract without a Federation, run directory or layers: the role methods called as the
        participants and the aggregator would call them, for one round."""
        _, _, _, parties, proto = build_world(self.config(run={"rounds": 1}), "contract")
        proto.validate_participants(parties)
        proto.setup_server(parties)
        for party in parties:
            proto.setup_party(party)
            proto.prepare_party(party)
        ids = [p.id for p in parties]
        inboxes = addressed(proto.open_round(1, ids), ids)
        sent = [m for p in parties for m in as_list(proto.client_step(p, inboxes[p.id], 1))]
        if self.shares_nothing:
            assert sent == []
            return
        assert proto.uplink is not None
        to_server = [m for m in sent if m.receiver == AGGREGATOR]
        for msg in sent:
            assert msg.round == 1 and msg.sender in ids
        for msg in to_server:
            proto.uplink.check(msg)
            assert all(isinstance(v, torch.Tensor) and torch.isfinite(v).all() for v in msg.payload.values())
        spy = SpyAggregator()
        downlink = proto.server_step(1, to_server, spy) if to_server else None
        # A protocol that declares aggregatable fields combines only those. One that declares none cannot run under
        # secure aggregation (the layers refuse it by its schema) and may combine declared fields in the clear
        # (FedGen's reference mode averages the heads its server also reads one by one).
        aggregatable = {n for n, f in proto.uplink.fields.items() if f.aggregatable} or set(proto.uplink.fields)
        assert {field for _, field in spy.calls} <= aggregatable
        if to_server and aggregatable:
            assert spy.calls, "server_step combined the replies without the aggregator"
        inboxes = addressed(downlink, ids)
        for msg in sent:
            if msg.receiver != AGGREGATOR:
                inboxes[msg.receiver].append(msg)
        for party in parties:
            proto.client_update(party, inboxes[party.id], 1)
            accuracy = proto.evaluate(party)["accuracy"]
            assert 0.0 <= accuracy <= 1.0

    def test_runs_and_writes_the_run_directory(self, tmp_path: Path) -> None:
        summary = Federation(self.config(), tmp_path / "run", progress=False).run()
        for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.md", "accuracy.png", "run.json"):
            assert (tmp_path / "run" / name).is_file(), name
        assert summary["protocol"] == self.protocol
        assert len(summary["participants"]) == 3
        assert all(0.0 <= p["final_accuracy"] <= 1.0 for p in summary["participants"])
        # Round 0 (after pre-training) plus one line per round.
        assert len(metrics_without_time(tmp_path / "run")) == 3

    @pytest.mark.integration
    def test_same_seed_same_metrics_and_other_seed_differs(self, tmp_path: Path) -> None:
        Federation(self.config(), tmp_path / "a", progress=False).run()
        Federation(self.config(), tmp_path / "b", progress=False).run()
        Federation(self.config(run={"seed": 11}), tmp_path / "c", progress=False).run()
        a, b, c = (metrics_without_time(tmp_path / x) for x in "abc")
        assert a == b
        assert [r["participants"] for r in a] != [r["participants"] for r in c]

    def test_messages_match_declared_schemas_and_aggregation_goes_through_the_aggregator(self, tmp_path: Path) -> None:
        transport = RecordingTransport()
        fed = Federation(self.config(), tmp_path / "run", progress=False, transport=transport)
        spy = SpyAggregator()
        fed.aggregator = spy
        fed.run()
        # The instance's schema: a protocol may declare its uplink from its config (FedGen's modes).
        proto = fed.protocol
        if self.shares_nothing:
            assert transport.sent == []
            return
        uplinks = [m for m in transport.sent if proto.uplink is not None and m.kind == proto.uplink.kind]
        assert uplinks, "the protocol sent no uplink message"
        for msg in uplinks:
            proto.uplink.check(msg)  # type: ignore[union-attr]
            for value in msg.payload.values():
                assert isinstance(value, torch.Tensor) and torch.isfinite(value).all()
        aggregatable = {n for n, f in proto.uplink.fields.items() if f.aggregatable}  # type: ignore[union-attr]
        aggregated = {field for _, field in spy.calls}
        assert aggregated, "server_step never called the aggregator"
        assert aggregated <= aggregatable, f"aggregated undeclared fields {aggregated - aggregatable}"

    @pytest.mark.integration
    def test_an_owners_own_learning_rate_is_the_rate_its_private_data_trains_at_and_no_one_elses(
            self, tmp_path: Path) -> None:
        own_rate = 0.0123  # no protocol's default
        participants = [p.model_dump(exclude_none=True) for p in self.config().participants]
        if self.protocol == "pooled":
            participants[1]["lr"] = own_rate
            with pytest.raises(ValueError, match=r"participants\.1\.lr = 0\.0123: the pooled baseline"):
                self.config(participants=participants)
            return

        def rates_trained_at(config: Any, out: Path) -> dict[str, set[float]]:
            fed = Federation(config, out, progress=False)
            rates: dict[str, set[float]] = {}
            for party in fed.parties:
                party.trainer = RateRecorder(party.trainer, rates.setdefault(party.id, set()))
            summary = fed.run()
            # The summary and the report say who trained at its own rate.
            assert [p.get("lr") for p in summary["participants"]] == [p.get("lr") for p in participants]
            return {pid: {round(r, 12) for r in seen} for pid, seen in rates.items()}

        before = rates_trained_at(self.config(), tmp_path / "protocol_rate")
        participants[1]["lr"] = own_rate
        after = rates_trained_at(self.config(participants=participants), tmp_path / "own_rate")
        owner = participants[1]["id"]
        assert f"| {owner} | {participants[1]['model']} (own lr 0.0123) |" in (tmp_path / "own_rate" / "report.md").read_text()
        # The owner's whole schedule (a protocol may decay its rate over rounds) starts from its own rate ...
        scale = own_rate / max(before[owner])
        assert after[owner] == {round(r * scale, 12) for r in before[owner]} and max(after[owner]) == own_rate
        # ... and nobody else's changes.
        assert {p: r for p, r in after.items() if p != owner} == {p: r for p, r in before.items() if p != owner}

    @pytest.mark.integration
    def test_resume_after_a_crash_matches_an_uninterrupted_run(self, tmp_path: Path) -> None:
        cfg = self.config(run={"rounds": 3})
        Federation(cfg, tmp_path / "full", progress=False).run()
        with pytest.raises(Crash):
            Federation(cfg, tmp_path / "cut", progress=False, on_round_end=crash_after_round(1)).run()
        assert not (tmp_path / "cut" / "summary.json").exists()
        Federation(cfg, tmp_path / "cut", progress=False, resume=True).run()
        assert metrics_without_time(tmp_path / "cut") == metrics_without_time(tmp_path / "full")

    @pytest.mark.integration
    def test_participants_on_their_own_nodes_compute_what_the_simulation_computes(self, tmp_path: Path) -> None:
        """Each participant in its own node (own directory, own protocol instance rebuilt from disk for every
        request, messages as bytes) gives the simulation's metrics: nothing passes between server and
        participants except messages, and a node's state survives its process."""
        from securefl.deploy.provision import provision
        from securefl.deploy.remote import isolated_participants

        cfg = self.config(run={"rounds": 2})
        remote, nodes = isolated_participants(cfg, tmp_path / "nodes", fresh_process=True)
        if get_protocol(self.protocol).simulation_only:
            with pytest.raises(ProtocolSetupError, match="cannot run on separate nodes"):
                Federation(cfg, tmp_path / "coordinator", progress=False, remote=remote)
            return
        Federation(cfg, tmp_path / "sim", progress=False).run()
        provision(cfg, coordinator_dir=tmp_path / "coordinator", node_dirs={pid: tmp_path / "nodes" / pid for pid in nodes})
        Federation(cfg, tmp_path / "coordinator", progress=False, remote=remote).run()
        assert metrics_without_time(tmp_path / "coordinator") == metrics_without_time(tmp_path / "sim")
        # The coordinator's directory holds no participant's private key.
        assert sorted(p.name for p in (tmp_path / "coordinator" / "keys").glob("*.ed25519")) == ["aggregator.ed25519"]

    @pytest.mark.integration
    def test_masking_between_nodes_gives_the_simulations_metrics(self, tmp_path: Path) -> None:
        """Pairwise masking on separate nodes: the key agreement, the masked inputs and the unmasking travel
        as messages between the coordinator and nodes rebuilt from disk for every request, and the decoded
        sums (exact in the ring) give the simulation's metrics. A protocol masking refuses is refused the
        same way on nodes."""
        from securefl.deploy.provision import provision
        from securefl.deploy.remote import RemoteSetupError, isolated_participants
        from securefl.layers.base import LayerSetupError

        cfg = self.config(run={"rounds": 2}, secure_aggregation="masking")
        if get_protocol(self.protocol).simulation_only:
            return  # refused on nodes whatever the layers (the test above)
        remote, nodes = isolated_participants(cfg, tmp_path / "nodes", fresh_process=True)
        provision(cfg, coordinator_dir=tmp_path / "coordinator", node_dirs={pid: tmp_path / "nodes" / pid for pid in nodes})
        try:
            Federation(cfg, tmp_path / "sim", progress=False).run()
        except LayerSetupError as refusal:
            # The nodes refuse first, when they receive the config; the coordinator names their reason.
            with pytest.raises(RemoteSetupError) as on_nodes:
                Federation(cfg, tmp_path / "coordinator", progress=False, remote=remote)
            assert str(refusal) in str(on_nodes.value)
            return
        Federation(cfg, tmp_path / "coordinator", progress=False, remote=remote).run()
        deployed = metrics_without_time(tmp_path / "coordinator")
        assert deployed == metrics_without_time(tmp_path / "sim")
        assert all(row["rejected"] == [] for row in deployed)
        if not self.shares_nothing:
            # Each node kept only the current round's SecAgg client, readable by its owner alone.
            states = sorted((tmp_path / "nodes").glob("*/keys/secagg/*.state"))
            assert [s.name for s in states] == [f"{pid}.round2.state" for pid in sorted(nodes)]
            assert all(s.stat().st_mode & 0o077 == 0 for s in states)

    def test_protocol_file_imports_no_privacy_crypto_or_transport_library(self) -> None:
        source = Path(inspect.getfile(get_protocol(self.protocol))).read_text()
        for node in ast.walk(ast.parse(source)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IMPORTS), name
