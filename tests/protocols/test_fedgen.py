"""FedGen: the contract (both modes), plus behaviour the paper and its reference code imply."""

from __future__ import annotations

import ast
import copy
import inspect
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from securefl.config import ConfigError, parse_config
from securefl.core.aggregator import PlainAggregator
from securefl.core.message import AGGREGATOR, Message
from securefl.core.training import PlainTrainer, TrainStats, cross_entropy_loss, kl_distillation
from securefl.models.generator import ConditionalGenerator, diversity_loss
from securefl.protocols import ProtocolSetupError, get_protocol
from securefl.protocols.base import read_updates
from securefl.protocols.fedgen_common import FedGen, label_weights, regularizer_weight, teacher_loss
from securefl.protocols.fedgen_private import FedGenPrivate
from securefl.protocols.fedgen_reference import FedGenReference
from securefl.runtime.federation import Federation
from tests.conftest import tiny_config, tiny_raw
from tests.protocols.contract import FORBIDDEN_IMPORTS, ProtocolContract, RecordingTransport, SpyAggregator

FAST = {"local_steps": 5, "generator_steps": 10}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # The machine is shared; torch's default thread pool only adds contention on these tiny models.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TestFedGenContract(ProtocolContract):
    protocol = "fedgen"
    overrides = {"fedgen": FAST}


class TestFedGenReferenceContract(ProtocolContract):
    protocol = "fedgen"
    overrides = {"fedgen": {**FAST, "mode": "reference"}}

    def test_messages_match_declared_schemas_and_aggregation_goes_through_the_aggregator(self, tmp_path: Path) -> None:
        # The reference mode declares its own uplink (individual heads in the clear), so check
        # against the instance's schema, which is the one the runtime enforces.
        transport = RecordingTransport()
        fed = Federation(self.config(), tmp_path / "run", progress=False, transport=transport)
        spy = SpyAggregator()
        fed.aggregator = spy
        fed.run()
        schema = fed.protocol.uplink
        assert schema is not None and schema.kind == "fedgen_reference_update"
        uplinks = [m for m in transport.sent if m.kind == schema.kind]
        assert len(uplinks) == 3 * 2
        for msg in uplinks:
            schema.check(msg)
            assert all(torch.isfinite(v).all() for v in msg.payload.values())
        # The reference's FedAvg of the heads, weighted by sample counts.
        assert set(spy.calls) == {("weighted_mean", "shared"), ("mean", "label_counts")}


def _federation(tmp_path: Path, **changes: Any) -> Federation:
    fedgen = changes.pop("fedgen", {})
    return Federation(tiny_config(protocol="fedgen", fedgen=fedgen, **changes), tmp_path / "run", progress=False)


def _one_round_of_clients(fed: Federation, rnd: int = 1) -> list[Message]:
    proto = fed.protocol
    down = proto.open_round(rnd, [p.id for p in fed.parties])
    return [proto.client_step(p, [down[p.id]], rnd) for p in fed.parties]


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in module.state_dict().values() if t.is_floating_point()])


def _head_accuracy_on_own_labels(generator: ConditionalGenerator, fed: Federation, heads: list) -> list[float]:
    """For each head, how often it classifies G(ε, y) as y, over the labels its user holds."""
    rng = torch.Generator().manual_seed(0)
    generator.eval()
    out = []
    for party, head in zip(fed.parties, heads, strict=True):
        labels = torch.nonzero(party.train.label_counts(10) > 0).flatten().repeat_interleave(64)
        eps = generator.sample_noise(len(labels), generator=rng)
        with torch.no_grad():
            pred = head(generator(labels, eps)[0]).argmax(dim=1)
        out.append(float((pred == labels).float().mean()))
    return out


# ----- the generator learns what the heads agree on --------------------------------------
@pytest.mark.parametrize("mode", ["reference", "private"])
def test_trained_generator_features_are_classified_as_their_label_by_the_heads(tmp_path: Path, mode: str) -> None:
    fed = _federation(tmp_path, fedgen={"mode": mode})
    torch.manual_seed(0)
    replies = _one_round_of_clients(fed)
    heads = [copy.deepcopy(p.model.head) for p in fed.parties]  # the heads G is trained against
    party = fed.parties[0]
    before = _head_accuracy_on_own_labels(copy.deepcopy(fed.protocol.replica(party).generator), fed, heads)
    fed.protocol.client_update(party, [fed.protocol.server_step(1, replies, fed.aggregator)[party.id]], 1)
    after = _head_accuracy_on_own_labels(fed.protocol.replica(party).generator, fed, heads)
    assert max(before) < 0.3, before  # an untrained G is at chance
    assert min(after) > 0.8, after


# ----- the schedule, the losses and the weights -------------------------------------------
def test_regulariser_weight_schedule() -> None:
    assert regularizer_weight(0, 10.0) == 10.0
    assert regularizer_weight(1, 10.0) == pytest.approx(9.8)
    assert regularizer_weight(50, 10.0) == pytest.approx(10 * 0.98**50)  # 3.6417...
    assert regularizer_weight(50, 10.0) == pytest.approx(3.64170, abs=1e-5)
    assert regularizer_weight(1000, 10.0) == 1e-4  # the floor


def test_user_loss_is_plain_ce_in_round_one_and_the_full_regulariser_after(tmp_path: Path) -> None:
    fed = _federation(tmp_path)
    proto, party = fed.protocol, fed.parties[0]
    generator = proto._new_generator()
    available = proto.classes
    assert proto.user_loss(generator, available, 1) is cross_entropy_loss
    assert proto.generated_loss(generator, available, 1) is None
    model, x, y = party.model, party.train.x[:32], party.train.y[:32]
    torch.manual_seed(7)
    # The private part and the generated-feature part (handed to the trainer separately, so that a
    # DP trainer clips only the former) together make the reference's user loss.
    got = proto.user_loss(generator, available, 3)(model, x, y) + proto.generated_loss(generator, available, 3)(model)
    # By hand, with the same random draws: round 3 is t = 2, so α = β = 10 · 0.98².
    torch.manual_seed(7)
    weight = 10 * 0.98**2
    generator.eval()
    logits = model(x)
    with torch.no_grad():
        target = model.head(generator(y)[0])
        y_hat = available[torch.randint(len(available), (32,))]
        z_hat = generator(y_hat)[0]
    expected = (F.cross_entropy(logits, y) + weight * kl_distillation(logits, target)
                + (32 / 32) * weight * F.cross_entropy(model.head(z_hat), y_hat))
    torch.testing.assert_close(got, expected)


def test_user_loss_trains_the_model_never_the_generator(tmp_path: Path) -> None:
    fed = _federation(tmp_path)
    proto, party = fed.protocol, fed.parties[0]
    generator = proto._new_generator()
    loss = proto.user_loss(generator, proto.classes, 2)(party.model, party.train.x[:8], party.train.y[:8])
    loss.backward()
    assert all(p.grad is None for p in generator.parameters())
    assert party.model.head.weight.grad is not None


def test_diversity_loss_matches_a_hand_computation() -> None:
    eps = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    features = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    # d_ε(0,1) = mean((1, 4)) = 2.5, d_g(0,1) = mean((3, 0, 0)) = 1; two of four ordered pairs.
    torch.testing.assert_close(diversity_loss(eps, features), torch.tensor(math.exp(-2 * 2.5 / 4)))

    gen = torch.Generator().manual_seed(1)
    eps, features = torch.rand(3, 4, generator=gen), torch.randn(3, 5, generator=gen)
    total = 0.0
    for i in range(3):
        for j in range(3):
            d_eps = sum((eps[i, k] - eps[j, k]) ** 2 for k in range(4)) / 4
            d_g = sum(abs(features[i, k] - features[j, k]) for k in range(5)) / 5
            total += float(d_eps * d_g)
    torch.testing.assert_close(diversity_loss(eps, features), torch.tensor(math.exp(-total / 9)))


def test_label_weights_are_each_users_share_of_the_label() -> None:
    counts = torch.tensor([[2, 0, 1], [6, 0, 0], [2, 0, 3]])  # users x classes
    weights, qualified = label_weights(counts)
    expected = torch.tensor([[0.2, 0.6, 0.2], [0.0, 0.0, 0.0], [0.25, 0.0, 0.75]])  # classes x users
    torch.testing.assert_close(weights, expected)
    assert qualified.tolist() == [0, 2]  # nobody holds label 1: G is not trained on it


def test_teacher_loss_is_the_weighted_sum_over_heads() -> None:
    torch.manual_seed(0)
    heads = [torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)]
    z, y = torch.randn(5, 4), torch.tensor([0, 2, 2, 0, 1])
    weights = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    with torch.no_grad():
        by_hand = sum(
            sum(float(weights[y[i], u]) * float(F.cross_entropy(heads[u](z[i:i + 1]), y[i:i + 1]))
                for i in range(5)) / 5
            for u in range(2)
        )
        assert float(teacher_loss(heads, z, y, weights)) == pytest.approx(by_hand, rel=1e-5)


def test_reference_server_trains_g_with_the_weights_of_the_selected_users_counts(tmp_path: Path,
                                                                                 monkeypatch) -> None:  # type: ignore[no-untyped-def]
    fed = _federation(tmp_path, fedgen={"mode": "reference"})
    seen: dict[str, Any] = {}

    def record(heads, weights, labels):  # type: ignore[no-untyped-def]
        seen.update(heads=heads, weights=weights, labels=labels)

    monkeypatch.setattr(fed.protocol, "train_generator", record)
    replies = _one_round_of_clients(fed)
    fed.protocol.server_step(1, replies, fed.aggregator)
    counts = torch.stack([p.train.label_counts(10) for p in fed.parties]).float()
    totals = counts.sum(dim=0)
    for y in range(10):
        for u in range(3):
            want = float(counts[u, y] / totals[y]) if totals[y] > 0 else 0.0
            assert float(seen["weights"][y, u]) == pytest.approx(want)
    assert seen["labels"].tolist() == torch.nonzero(totals > 0).flatten().tolist()
    for head, party in zip(seen["heads"], fed.parties, strict=True):
        torch.testing.assert_close(head.weight, party.model.head.weight)  # each user's own head


# ----- the private mode never needs one user's head ---------------------------------------
def test_private_uplink_is_all_aggregatable_and_reference_is_declared_plaintext_only(tmp_path: Path) -> None:
    private = _federation(tmp_path / "p").protocol
    assert set(private.uplink.fields) == {"shared", "generator_update", "label_counts"}
    assert all(f.aggregatable for f in private.uplink.fields.values())
    assert private.secure_aggregation_note == ""
    reference = _federation(tmp_path / "r", fedgen={"mode": "reference"}).protocol
    assert not reference.uplink.fields["shared"].aggregatable
    assert not reference.uplink.fields["label_counts"].aggregatable
    assert "individually" in reference.secure_aggregation_note
    silent = _federation(tmp_path / "n", fedgen={"label_counts": "none"}).protocol
    assert set(silent.uplink.fields) == {"shared", "generator_update"}


def test_private_server_reads_uplinks_only_through_the_aggregator(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    inside = {"depth": 0}
    outside_reads: list[tuple[str, str]] = []

    class FlaggingAggregator(SpyAggregator):
        def _flagged(self, method, *args):  # type: ignore[no-untyped-def]
            inside["depth"] += 1
            try:
                return method(*args)
            finally:
                inside["depth"] -= 1

        def sum(self, replies, field):  # type: ignore[no-untyped-def]
            return self._flagged(super().sum, replies, field)

        def mean(self, replies, field):  # type: ignore[no-untyped-def]
            return self._flagged(super().mean, replies, field)

        def weighted_mean(self, replies, field, weights):  # type: ignore[no-untyped-def]
            return self._flagged(super().weighted_mean, replies, field, weights)

    real_tensor = Message.tensor

    def watched_tensor(self: Message, name: str) -> torch.Tensor:
        if self.receiver == AGGREGATOR and inside["depth"] == 0:
            outside_reads.append((self.sender, name))
        return real_tensor(self, name)

    monkeypatch.setattr(Message, "tensor", watched_tensor)
    fed = Federation(tiny_config(protocol="fedgen", fedgen=FAST), tmp_path / "run", progress=False)
    spy = FlaggingAggregator()
    fed.aggregator = spy
    fed.run()
    assert outside_reads == []
    # Every field an unweighted mean (head_aggregation: auto), which a masking layer supports.
    assert set(spy.calls) == {("mean", "generator_update"), ("mean", "label_counts"), ("mean", "shared")}


def test_private_server_result_depends_only_on_the_aggregate(tmp_path: Path) -> None:
    """Moving mass between two users' payloads, sum unchanged, must not change what the server sends."""
    fed = _federation(tmp_path, fedgen=FAST)
    torch.manual_seed(0)
    replies = _one_round_of_clients(fed)
    shifted = list(replies)
    for field in ("shared", "generator_update", "label_counts"):
        delta = torch.randn_like(replies[0].tensor(field))
        shifted[0] = shifted[0].with_payload(**{field: shifted[0].tensor(field) + delta})
        shifted[1] = shifted[1].with_payload(**{field: shifted[1].tensor(field) - delta})
    servers = [copy.deepcopy(fed.protocol) for _ in range(2)]
    sent = [read_updates(server.server_step(1, msgs, PlainAggregator())[replies[0].sender])
            for server, msgs in zip(servers, (replies, shifted), strict=True)]
    (a,), (b,) = sent
    assert set(a.fields) == set(b.fields) == {"shared", "generator_update", "label_counts"}
    for field in a.fields:
        torch.testing.assert_close(a.fields[field], b.fields[field], atol=1e-5, rtol=1e-5)
    # The means, and nothing else, go down: a user applies them to its replica.
    for field in a.fields:
        torch.testing.assert_close(a.fields[field], torch.stack([r.tensor(field) for r in replies]).mean(0))


def test_a_user_that_sat_out_catches_up_to_the_same_replica(tmp_path: Path) -> None:
    fed = _federation(tmp_path, fedgen=FAST)
    proto = fed.protocol
    p0, p1, p2 = fed.parties
    for rnd, sampled in ((1, [p0, p1]), (2, [p0, p1])):
        down = proto.open_round(rnd, [p.id for p in sampled])
        replies = [proto.client_step(p, [down[p.id]], rnd) for p in sampled]
        broadcast = proto.server_step(rnd, replies, fed.aggregator)
        for party in sampled:
            proto.client_update(party, [broadcast[party.id]], rnd)
    assert [proto.replica(p).version for p in fed.parties] == [2, 2, 0]
    catch_up = proto.open_round(3, [p2.id])[p2.id]
    assert [u.version for u in read_updates(catch_up)] == [1, 2]  # every update it missed, in order
    reply = proto.client_step(p2, [catch_up], 3)
    mine, theirs = proto.replica(p2), proto.replica(p0)
    assert mine.version == 2 and mine.prior_rounds == theirs.prior_rounds == 2
    assert torch.equal(_flat(mine.generator), _flat(theirs.generator))
    assert torch.equal(_flat(mine.shared), _flat(theirs.shared))
    assert torch.equal(mine.label_prior, theirs.label_prior)
    # The server keeps what some user has not acknowledged: p2 now says it holds 2; p0 and p1 last said 1
    # (in their round-2 uplinks), so update 2 stays until they say otherwise, with this round's 3.
    assert reply.meta["replica_version"] == 2
    proto.server_step(3, [reply], fed.aggregator)
    assert [u.version for u in proto.log.updates] == [2, 3]


def test_private_local_weights_make_the_users_shares_sum_to_l_g(tmp_path: Path) -> None:
    proto = _federation(tmp_path).protocol
    counts = torch.tensor([[4.0, 0, 2, 0, 0, 0, 0, 0, 0, 0], [4.0, 1, 0, 0, 0, 0, 0, 0, 0, 0]])
    prior = counts.mean(dim=0)  # the broadcast mean histogram m(y)
    omegas = [proto.private_label_weights(c, prior, 2)[0] for c in counts]
    weights, _ = label_weights(counts)
    for u in range(2):  # ω_u(y) = |S| · w_{y,u}
        torch.testing.assert_close(omegas[u], 2 * weights[:, u])
    # Round 1 (no histogram yet) and label_counts: none fall back to uniform weights.
    omega, labels = proto.private_label_weights(counts[0], torch.zeros(10), 2)
    assert torch.equal(omega, torch.ones(10)) and labels.tolist() == list(range(10))


# ----- traps: steps not epochs, tiny users -------------------------------------------------
class CountingTrainer(PlainTrainer):
    def __init__(self) -> None:
        self.stats: list[TrainStats] = []

    def fit(self, *args, **kwargs) -> TrainStats:  # type: ignore[no-untyped-def]
        assert kwargs["steps"] == 20 and kwargs.get("epochs") is None
        stats = super().fit(*args, **kwargs)
        self.stats.append(stats)
        return stats


def test_a_user_with_five_records_trains_twenty_steps_of_batch_32(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    order = rng.permutation(1347)
    assignment = [sorted(order[:5].tolist()), sorted(order[5:305].tolist()), sorted(order[305:605].tolist())]
    raw = tiny_raw(protocol="fedgen", run={"rounds": 2}, data={"val_fraction": 0.0, "public_size": 0})
    raw["data"]["partition"] = {"kind": "explicit", "assignment": assignment}
    fed = Federation(parse_config(raw), tmp_path / "run", progress=False)
    trainers = [CountingTrainer() for _ in fed.parties]
    for party, trainer in zip(fed.parties, trainers, strict=True):
        party.trainer = trainer
    assert fed.parties[0].num_samples == 5
    fed.run()  # round 2 uses the generator regulariser
    assert [s.steps for s in trainers[0].stats] == [20, 20]
    assert [s.samples for s in trainers[0].stats] == [100, 100]  # 20 batches of all 5 records
    # 20 steps, not 20 epochs: two reshuffled passes over 300 records (9 full batches and one of 12 each).
    assert [s.steps for s in trainers[1].stats] == [20, 20]
    assert [s.samples for s in trainers[1].stats] == [600, 600]


# ----- set-up and configuration ----------------------------------------------------------
def test_whole_model_sharing_needs_identical_models(tmp_path: Path) -> None:
    with pytest.raises(ProtocolSetupError, match="share=head"):
        _federation(tmp_path / "a", fedgen={"share": "full"})
    same = [{"id": f"p{i}", "model": "mlp_s"} for i in range(3)]
    fed = _federation(tmp_path / "b", fedgen={**FAST, "share": "full"}, participants=same, run={"rounds": 1})
    fed.run()
    shared = fed.protocol.replica(fed.parties[0]).shared
    assert isinstance(shared, torch.nn.Module) and hasattr(shared, "head")


@pytest.mark.parametrize(("mode", "cls"), [("private", FedGenPrivate), ("reference", FedGenReference)])
def test_the_registry_builds_the_class_of_the_configured_mode(tmp_path: Path, mode: str, cls: type) -> None:
    assert get_protocol("fedgen") is FedGen
    protocol = _federation(tmp_path, fedgen={"mode": mode}).protocol
    assert type(protocol) is cls and isinstance(protocol, FedGen)
    assert type(copy.deepcopy(protocol)) is cls


@pytest.mark.parametrize("cls", [FedGenPrivate, FedGenReference])
def test_the_mode_files_import_no_privacy_crypto_or_transport_library(cls: type) -> None:
    # The contract checks the registry entry's file (fedgen_common); each mode's own file is checked here.
    source = Path(inspect.getfile(cls)).read_text()
    for node in ast.walk(ast.parse(source)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            assert not any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IMPORTS), name


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ConfigError, match="fedgen.generator_batch_size"):
        tiny_config(protocol="fedgen", fedgen={"generator_batch_size": 1})
    with pytest.raises(ConfigError, match="fedgen.mode"):
        tiny_config(protocol="fedgen", fedgen={"mode": "server"})


def test_headline_accuracy_is_the_users_extractor_with_the_averaged_head(tmp_path: Path) -> None:
    fed = _federation(tmp_path, fedgen=FAST)
    replies = _one_round_of_clients(fed)
    party = fed.parties[0]
    fed.protocol.client_update(party, [fed.protocol.server_step(1, replies, fed.aggregator)[party.id]], 1)
    averaged = fed.protocol.replica(party).shared
    torch.testing.assert_close(_flat(averaged), torch.stack([r.tensor("shared") for r in replies]).mean(0))
    with torch.no_grad():
        party.model.eval()
        logits = averaged(party.model.extractor(fed.ctx.test_x))
    by_hand = float((logits.argmax(dim=1) == fed.ctx.test_y).float().mean())
    metrics = fed.protocol.evaluate(party)
    assert metrics["accuracy"] == pytest.approx(by_hand)
    assert set(metrics) == {"accuracy", "local_accuracy", "generator_accuracy"}
    assert isinstance(fed.protocol, FedGen)


def test_an_owners_approval_covers_the_code_of_both_modes() -> None:
    """The registry's class is the shared file; the releases are computed in the mode files, so the approval's
    code fingerprint must cover them too (a changed private-mode update must void an approval)."""
    from securefl.deploy.approval import code_version

    sources = code_version("fedgen")["protocol_source"].split(", ")
    assert {"fedgen_common.py", "fedgen_private.py", "fedgen_reference.py", "base.py"} <= set(sources)
