"""Secure aggregation composed at the call site: same results, sealed wire, refusals before round 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from securefl.core.message import AGGREGATOR, Message
from securefl.core.sealed import SealedTensor
from securefl.crypto.ckks import EncryptedVector, SecretKeyRequired
from securefl.crypto.errors import SecAggAbort
from securefl.layers.base import LayerSetupError
from securefl.layers.secure_aggregation import CkksLayer
from securefl.runtime.federation import Federation
from tests.conftest import metrics_without_time, tiny_config
from tests.layers.faults import FaultyTransport
from tests.protocols.contract import RecordingTransport


def _accuracies(run: Path) -> list[float]:
    return [row["mean_accuracy"] for row in metrics_without_time(run)]


@pytest.mark.parametrize("scheme", ["ckks", "masking"])
def test_fedmd_under_secure_aggregation_matches_plaintext(scheme: str, tmp_path: Path) -> None:
    plain = Federation(tiny_config(), tmp_path / "plain", progress=False).run()
    transport = RecordingTransport()
    secure = Federation(tiny_config(secure_aggregation=scheme), tmp_path / scheme, progress=False,
                        transport=transport).run()
    assert abs(secure["mean_accuracy"] - plain["mean_accuracy"]) < 0.02
    # On the wire every logits reply is sealed: bytes chunks plus meta, no plaintext tensor.
    uplinks = [m for m in transport.sent if m.receiver == AGGREGATOR]
    assert uplinks
    for msg in uplinks:
        assert not isinstance(msg.payload["logits"], torch.Tensor)
        assert SealedTensor.from_message(msg, "logits").scheme == {"ckks": "ckks", "masking": "secagg"}[scheme]


# Protocols whose global state (HeteroFL's model, FedGen's generator) the participants hold.
# Sized to learn something in three rounds (accuracies well above chance), in about a second.
GLOBAL_STATE = {
    "heterofl": {"protocol": "heterofl", "heterofl": {"model": "mlp", "hidden_sizes": [16], "local_epochs": 1,
                                                      "batch_size": 32, "lr": 0.1, "proportions": "a1-b1",
                                                      "norm": "gn"}},
    "fedgen": {"protocol": "fedgen", "fedgen": {"local_steps": 30, "generator_steps": 10, "lr": 0.1},
               "participants": [{"id": f"p{i}", "model": "mlp_s"} for i in range(3)]},
}


@pytest.mark.parametrize("setup", [{}, GLOBAL_STATE["heterofl"], GLOBAL_STATE["fedgen"]],
                         ids=["fedmd", "heterofl", "fedgen"])
def test_ckks_aggregator_holds_no_secret_key_and_cannot_decrypt(setup: dict, tmp_path: Path) -> None:
    fed = Federation(tiny_config(secure_aggregation="ckks", **setup), tmp_path / "run", progress=False)
    layer = next(layer for layer in fed.layers if isinstance(layer, CkksLayer))
    aggregator = layer.wrap_aggregator(fed.aggregator, 1)
    assert not aggregator.ctx.holds_secret_key
    sealed = layer._keys.seal(torch.ones(8), field="x")
    with pytest.raises(SecretKeyRequired):
        aggregator.ctx.open(sealed)
    # The raw TenSEAL context behind it refuses too.
    enc = aggregator.ctx.tenseal_context
    assert not enc.has_secret_key()


class Recorded:
    """A run of two rounds, two of three participants a round, with what crossed the protocol's hands.

    Seed 1 samples p0 and p2 in round 1, then p1 and p2: p1 catches up on round 1's update in round 2.
    """

    def __init__(self, tmp_path: Path, protocol: str, scheme: str) -> None:
        cfg = tiny_config(secure_aggregation=scheme, run={"rounds": 2, "participation": 0.67, "seed": 1},
                          **GLOBAL_STATE[protocol])
        self.transport = RecordingTransport()
        self.fed = Federation(cfg, tmp_path / scheme, progress=False, transport=self.transport)
        proto = self.fed.protocol
        # What the participants applied (opened, per update version) and what they sent (before sealing).
        self.applied: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}
        self.sent: dict[int, list[dict[str, torch.Tensor]]] = {}
        apply, step = proto.apply_update, proto.client_step  # type: ignore[attr-defined]

        def record_update(replica, update):  # type: ignore[no-untyped-def]
            self.applied.setdefault(update.version, (update.round, update.fields))
            apply(replica, update)

        def record_reply(party, inbox, rnd):  # type: ignore[no-untyped-def]
            reply = step(party, inbox, rnd)
            self.sent.setdefault(rnd, []).append({k: v for k, v in reply.payload.items()})
            return reply

        proto.apply_update, proto.client_step = record_update, record_reply  # type: ignore[attr-defined,method-assign]
        self.summary = self.fed.run()

    def plaintext_aggregate(self, version: int) -> dict[str, torch.Tensor]:
        """What the aggregator should have returned for ``version``, from this run's own replies."""
        rnd, fields = self.applied[version]
        replies = self.sent[rnd]
        if set(fields) == {"sum"}:  # HeteroFL: the sum of the padded slices
            return {"sum": torch.stack([r["padded_update"] for r in replies]).sum(0)}
        return {name: torch.stack([r[name] for r in replies]).mean(0) for name in fields}  # FedGen: means


@pytest.mark.parametrize("protocol", ["heterofl", "fedgen"])
def test_global_state_under_ckks_matches_plaintext_and_the_server_never_reads_it(protocol: str,
                                                                                  tmp_path: Path) -> None:
    plain, ckks = Recorded(tmp_path, protocol, "none"), Recorded(tmp_path, protocol, "ckks")
    assert sorted(ckks.applied) == sorted(plain.applied) == [1, 2]
    # Every aggregate the participants applied is the plaintext aggregate of the replies, within CKKS's
    # precision (the catch-ups of those who sat out included).
    for version in ckks.applied:
        opened, expected = ckks.applied[version][1], ckks.plaintext_aggregate(version)
        assert set(opened) == set(expected) == {"heterofl": {"sum"},
                                                "fedgen": {"shared", "generator_update", "label_counts"}}[protocol]
        for name in expected:
            torch.testing.assert_close(opened[name], expected[name], atol=1e-5, rtol=1e-6)
    # Round 1's replies are the same as in the plaintext run: so are its aggregates, up to that error
    # (which is not zero: they were encrypted). Round 2 trains on models that differ by that error,
    # which SGD amplifies (and SEAL's encryption noise is random): its accuracies agree only closely.
    first_plain, first_ckks = plain.applied[1][1], ckks.applied[1][1]
    for name in first_plain:
        torch.testing.assert_close(first_ckks[name], first_plain[name], atol=1e-5, rtol=1e-6)
    assert any(not torch.equal(first_ckks[n], first_plain[n]) for n in first_plain)
    accuracies = [[p["final_accuracy"] for p in run.summary["participants"]] for run in (plain, ckks)]
    assert max(accuracies[0]) > 0.3  # a run that learned something
    for mine, theirs in zip(*accuracies, strict=True):  # measured: at most 0.009 apart over 6 runs
        assert abs(mine - theirs) <= 0.03, accuracies
    assert abs(ckks.summary["mean_accuracy"] - plain.summary["mean_accuracy"]) <= 0.02

    # On the wire every aggregate is sealed, the updates a participant missed included.
    downs = [m for m in ckks.transport.sent if m.receiver != AGGREGATOR and m.meta.get("updates")]
    catch_ups = [m for m in downs if m.kind != ckks.fed.protocol.downlink.kind]  # type: ignore[union-attr]
    assert [m.receiver for m in catch_ups] == ["p1"]
    for msg in downs:
        for entry in msg.meta["updates"]:
            for name in entry["fields"]:
                assert SealedTensor.from_message(msg, f"{name}@{entry['version']}").scheme == "ckks"
    # What the server keeps for those who sat out is sealed too: it never holds the global state.
    log = ckks.fed.protocol.log  # type: ignore[attr-defined]
    # Kept until acknowledged: p0 sat out round 2 and last said (in round 1) that it holds version 0.
    # HeteroFL's update 2 has a contributor for every element, so it alone sets the model: the log keeps
    # nothing older (decided from public counts, with the sums still sealed). FedGen's updates add up.
    kept = {"heterofl": [2], "fedgen": [1, 2]}[protocol]
    assert [u.version for u in log.updates] == kept
    if protocol == "heterofl":
        assert ckks.fed.protocol.supersedes(log.updates[0])  # type: ignore[attr-defined]
    assert all(isinstance(v, SealedTensor) for u in log.updates for v in u.fields.values())


def test_fedgen_under_masking_applies_the_plaintext_means_after_fixed_point_decoding(tmp_path: Path) -> None:
    masked = Recorded(tmp_path, "fedgen", "masking")
    uplinks = [m for m in masked.transport.sent if m.receiver == AGGREGATOR]
    assert uplinks and all(SealedTensor.from_message(m, "generator_update").scheme == "secagg" for m in uplinks)
    # The server learns the means in the clear, equal to the replies' means up to the fixed-point
    # encoding (2^-24 steps), and every participant applies exactly those.
    for version in masked.applied:
        for name, value in masked.plaintext_aggregate(version).items():
            torch.testing.assert_close(masked.applied[version][1][name].float(), value, atol=1e-6, rtol=0)


def test_ckks_server_parses_each_reply_once_and_only_for_its_own_bytes(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    parsed_with: list[str] = []
    from_wire = EncryptedVector.from_wire.__func__  # type: ignore[attr-defined]

    def counting(cls, ctx, chunks, length, shape):  # type: ignore[no-untyped-def]
        parsed_with.append(type(ctx).__name__)
        return from_wire(cls, ctx, chunks, length, shape)

    monkeypatch.setattr(EncryptedVector, "from_wire", classmethod(counting))
    fed = Federation(tiny_config(secure_aggregation="ckks", run={"rounds": 1}), tmp_path / "run", progress=False)
    fed.run()
    # Three replies: the server's inbound check parses each once and the aggregator adds those vectors.
    assert parsed_with.count("PublicContext") == 3
    # A parsed vector counts only for the chunk objects it was parsed from, and only once.
    layer = next(layer for layer in fed.layers if isinstance(layer, CkksLayer))
    aggregator, keys = layer.wrap_aggregator(fed.aggregator, 2), layer._keys
    ones, twos = keys.seal(torch.ones(5)), keys.seal(torch.full((5,), 2.0))
    reply = twos.attach(Message(sender="p0", receiver=AGGREGATOR, run_id="r", round=2, kind="logits"), "logits")
    aggregator.hand_over("p0", "logits", ones, EncryptedVector.from_wire(layer.public_context, ones.chunks,
                                                                         ones.length, ones.shape))
    torch.testing.assert_close(keys.open(aggregator.sum([reply], "logits")), torch.full((5,), 2.0), atol=1e-5, rtol=0)
    sealed = SealedTensor.from_message(reply, "logits")
    aggregator.hand_over("p0", "logits", sealed, EncryptedVector.from_wire(layer.public_context, sealed.chunks,
                                                                           sealed.length, sealed.shape))
    for _ in range(2):  # the handed-over vector is used up by the first sum, which must not change the second
        torch.testing.assert_close(keys.open(aggregator.sum([reply], "logits")), torch.full((5,), 2.0),
                                   atol=1e-5, rtol=0)


def test_consensus_downlink_is_sealed_until_the_participant_opens_it(tmp_path: Path) -> None:
    transport = RecordingTransport()
    fed = Federation(tiny_config(secure_aggregation="ckks", run={"rounds": 1}), tmp_path / "run", progress=False,
                     transport=transport)
    fed.run()
    downs = [m for m in transport.sent if m.kind == "consensus"]
    assert downs and all(not isinstance(m.payload["consensus"], torch.Tensor) for m in downs)


@pytest.mark.parametrize("scheme", ["ckks", "masking"])
def test_fedgen_reference_mode_is_refused_before_round_one(scheme: str, tmp_path: Path) -> None:
    cfg = tiny_config(protocol="fedgen", secure_aggregation=scheme, fedgen={"mode": "reference"})
    with pytest.raises(LayerSetupError, match="individually"):
        Federation(cfg, tmp_path / "run", progress=False)


def test_ckks_refuses_a_server_that_reads_aggregates_and_masking_accepts_it(tmp_path: Path) -> None:
    """FedAvg's server keeps the global model itself (HeteroFL and FedGen leave theirs to the participants)."""
    same = {"participants": [{"id": f"p{i}", "model": "mlp_s"} for i in range(3)]}
    with pytest.raises(LayerSetupError, match="cannot decrypt"):
        Federation(tiny_config(protocol="fedavg", secure_aggregation="ckks", **same), tmp_path / "a", progress=False)
    plain = Federation(tiny_config(protocol="fedavg", **same), tmp_path / "b", progress=False).run()
    masked = Federation(tiny_config(protocol="fedavg", secure_aggregation="masking", **same), tmp_path / "c",
                        progress=False).run()
    assert abs(plain["mean_accuracy"] - masked["mean_accuracy"]) < 1e-3


TEN = {"participants": [{"id": f"p{i}", "model": "mlp_s"} for i in range(10)], "run": {"rounds": 1},
       "data": {"partition": {"kind": "dirichlet", "alpha": 100.0}}}


def test_masking_recovers_two_of_ten_dropouts_after_key_sharing(tmp_path: Path) -> None:
    dropped = {"p3", "p7"}
    transport = FaultyTransport(lambda m: m.receiver == AGGREGATOR and m.sender in dropped, lambda m: [])
    fed = Federation(tiny_config(secure_aggregation="masking", **TEN), tmp_path / "run", progress=False,
                     transport=transport)
    captured = {}
    real_step = fed.protocol.server_step

    def spy(rnd, replies, aggregator):  # type: ignore[no-untyped-def]
        down = real_step(rnd, replies, aggregator)
        captured["consensus"] = down.tensor("consensus")
        captured["senders"] = sorted(r.sender for r in replies)
        return down

    fed.protocol.server_step = spy  # type: ignore[method-assign]
    plaintext = {}
    real_client_step = fed.protocol.client_step

    def record(party, inbox, rnd):  # type: ignore[no-untyped-def]
        reply = real_client_step(party, inbox, rnd)
        plaintext[party.id] = reply.tensor("logits")
        return reply

    fed.protocol.client_step = record  # type: ignore[method-assign]
    fed.run()
    assert transport.injected == 2
    assert captured["senders"] == sorted({f"p{i}" for i in range(10)} - dropped)
    # The recovered consensus is the mean of the survivors' plaintext logits (fixed point: 2^-24 steps).
    expected = torch.stack([t for pid, t in plaintext.items() if pid not in dropped]).mean(0)
    torch.testing.assert_close(captured["consensus"].float(), expected, atol=1e-6, rtol=0)


def test_masking_below_threshold_aborts_cleanly_with_no_partial_result(tmp_path: Path) -> None:
    dropped = {f"p{i}" for i in range(5)}  # 5 survivors of 10, threshold 7
    transport = FaultyTransport(lambda m: m.receiver == AGGREGATOR and m.sender in dropped, lambda m: [])
    fed = Federation(tiny_config(secure_aggregation="masking", **TEN), tmp_path / "run", progress=False,
                     transport=transport)
    with pytest.raises(SecAggAbort, match="threshold|survivors"):
        fed.run()
    assert not (tmp_path / "run" / "summary.json").exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0]  # nothing from the aborted round was recorded


def test_a_payload_outside_the_ckks_range_is_withheld_and_logged_not_a_crash(tmp_path) -> None:
    """A diverged participant (logits of 1e7, beyond the CKKS range) is excluded from the round with a reason;
    the others' consensus still forms and the run completes."""
    import json

    from securefl.runtime.federation import Federation
    from tests.conftest import tiny_config

    # t = 2 of 3 (min_cohort(3, 0.5)): the other two's consensus is an aggregate participants may open.
    fed = Federation(tiny_config(secure_aggregation="ckks", privacy={"min_contributors": 0.5}), tmp_path / "run",
                     progress=False)
    original = fed.protocol.client_step

    def diverged(party, inbox, rnd):  # type: ignore[no-untyped-def]
        msg = original(party, inbox, rnd)
        return msg.with_payload(logits=msg.tensor("logits") * 1e7) if party.id == "p1" else msg

    fed.protocol.client_step = diverged  # type: ignore[method-assign]
    fed.run()
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    for r in rounds:
        assert [x["sender"] for x in r["rejected"]] == ["p1"]
        assert "cannot be sealed" in r["rejected"][0]["reason"] and "CKKS range" in r["rejected"][0]["reason"]
