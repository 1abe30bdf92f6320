"""HeteroFL: the contract, plus behaviour the paper implies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator

from securefl.config import ConfigError, parse_config
from securefl.data.datasets import load_digits
from securefl.layers.base import LayerSetupError
from securefl.models.heterofl import (
    Scaler,
    StaticBatchNorm2d,
    build_heterofl_model,
    masked_cross_entropy,
)
from securefl.protocols.base import read_updates
from securefl.protocols.heterofl import HeteroFL, dynamic_rates, fixed_rates, parse_proportions
from securefl.runtime.federation import Federation
from tests.conftest import Crash, crash_after_round, metrics_without_time, tiny_raw
from tests.protocols.contract import ProtocolContract, RecordingTransport

SMALL = {"hidden_sizes": [8, 16], "local_epochs": 1, "batch_size": 32, "proportions": "a1-b1-c1"}


class TestHeteroFLContract(ProtocolContract):
    """GroupNorm: the configuration that runs everywhere (secure aggregation, DP-SGD, separate nodes)."""

    protocol = "heterofl"
    overrides = {"heterofl": {**SMALL, "norm": "gn"}}


def test_static_batch_norm_resumes_exactly_and_is_refused_on_separate_nodes(tmp_path: Path) -> None:
    from securefl.deploy.remote import isolated_participants
    from securefl.protocols import ProtocolSetupError

    cfg = parse_config(tiny_raw(protocol="heterofl", run={"rounds": 2}, heterofl={**SMALL, "norm": "bn"}))
    Federation(cfg, tmp_path / "full", progress=False).run()
    with pytest.raises(Crash):
        Federation(cfg, tmp_path / "cut", progress=False, on_round_end=crash_after_round(1)).run()
    Federation(cfg, tmp_path / "cut", progress=False, resume=True).run()
    # The replicas' sBN statistics are part of the checkpoint: the resumed run evaluates the same models.
    assert metrics_without_time(tmp_path / "cut") == metrics_without_time(tmp_path / "full")

    remote, _ = isolated_participants(cfg, tmp_path / "nodes")
    with pytest.raises(ProtocolSetupError, match="cannot run on separate nodes.*norm: gn"):
        Federation(cfg, tmp_path / "coordinator", progress=False, remote=remote)


def _federation(tmp_path: Path, *, partition: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
                **heterofl: Any) -> Federation:
    raw = tiny_raw(protocol="heterofl", heterofl={**SMALL, **heterofl}, data=data or {})
    if partition is not None:
        raw["data"]["partition"] = partition
    return Federation(parse_config(raw), tmp_path / "run", progress=False)


def _class_partition(classes_per_party: list[list[int]]) -> dict[str, Any]:
    """Explicit silos holding exactly the given classes (records of a shared class are split between holders)."""
    y = load_digits(seed=3).y_train.numpy()  # the split TINY's run.seed = 3 produces
    holders: dict[int, list[int]] = {}
    for p, classes in enumerate(classes_per_party):
        for c in classes:
            holders.setdefault(c, []).append(p)
    assignment: list[list[int]] = [[] for _ in classes_per_party]
    for c, parties in holders.items():
        for part, p in zip(np.array_split(np.flatnonzero(y == c), len(parties)), parties, strict=True):
            assignment[p] += part.tolist()
    return {"kind": "explicit", "assignment": [sorted(a) for a in assignment]}


class ConstantTrainer:
    """Stands in for local training: sets every parameter of the sub-model to ``value``."""

    def __init__(self, value: float) -> None:
        self.value = value

    def fit(self, model, optimizer, x, y, **kwargs):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(self.value)


def test_aggregation_of_overlapping_slices_equals_hand_computed_element_averages(tmp_path: Path) -> None:
    splits = [[0, 1], [1, 2], [1, 3]]
    fed = _federation(tmp_path, partition=_class_partition(splits), data={"public_size": 0, "val_fraction": 0.0},
                      model="mlp", hidden_sizes=[8], norm="gn")
    proto: HeteroFL = fed.protocol  # type: ignore[assignment]
    by_rate = {proto.rate_of(p.id, 1): p for p in fed.parties}
    a, b, c = by_rate[1.0], by_rate[0.5], by_rate[0.25]  # rate 1/2 -> 4 hidden units, 1/4 -> 2; a sits out
    split_b, split_c = set(splits[b.index]), set(splits[c.index])
    vb, vc = 1.0, 3.0
    b.trainer, c.trainer = ConstantTrainer(vb), ConstantTrainer(vc)
    old = {k: v.detach().clone() for k, v in proto.replica(b).model.named_parameters()}

    down = proto.open_round(1, [b.id, c.id])
    replies = [proto.client_step(b, [down[b.id]], 1), proto.client_step(c, [down[c.id]], 1)]
    assert replies[0].meta["label_split"] == sorted(split_b)

    # What the rate-1/2 client sends: its values inside its slice, zeros outside, zeros on absent classes' rows.
    sent = replies[0].tensor("padded_update")
    offset = 0
    for name, p in proto.replica(b).model.named_parameters():
        block = sent[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
        if name == "classifier.weight":
            for k in range(10):
                assert torch.equal(block[k, :4], torch.full((4,), vb if k in split_b else 0.0))
                assert not block[k, 4:].any()
        elif name == "classifier.bias":
            assert block.tolist() == [vb if k in split_b else 0.0 for k in range(10)]
        else:
            assert torch.equal(block[:4], torch.full_like(block[:4], vb)) and not block[4:].any()

    broadcast = proto.server_step(1, replies, fed.aggregator)
    # The server only sums; the division by the public counts happens on every participant's replica.
    (update,) = read_updates(broadcast[b.id])
    assert torch.equal(update.fields["sum"], replies[0].tensor("padded_update") + replies[1].tensor("padded_update"))
    for party in (b, c):
        proto.client_update(party, [broadcast[party.id]], 1)
    new = dict(proto.replica(b).model.named_parameters())

    # Hidden layer (Linear 64 -> 8) and its GroupNorm: rows 0-1 both, rows 2-3 only b, rows 4-7 nobody.
    for name in ("body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias"):
        got = new[name].detach()
        assert torch.allclose(got[:2], torch.full_like(got[:2], (vb + vc) / 2)), name
        assert torch.allclose(got[2:4], torch.full_like(got[2:4], vb)), name
        assert torch.equal(got[4:], old[name][4:]), name
    assert new["body.1.weight"].shape == (8, 64)  # the input is never sliced: all 64 columns covered

    # Classifier: a client counts for a row only if it holds that class.
    weight, bias = new["classifier.weight"].detach(), new["classifier.bias"].detach()
    for k in range(10):
        for j in range(8):
            holders = [v for v, split, width in ((vb, split_b, 4), (vc, split_c, 2)) if k in split and j < width]
            want = sum(holders) / len(holders) if holders else float(old["classifier.weight"][k, j])
            assert float(weight[k, j]) == pytest.approx(want), (k, j)
        holders = [v for v, split in ((vb, split_b), (vc, split_c)) if k in split]
        want = sum(holders) / len(holders) if holders else float(old["classifier.bias"][k])
        assert float(bias[k]) == pytest.approx(want), k

    # The client that sat out gets the update with its next assignment and then holds the same model.
    assert proto.replica(a).version == 0
    proto.client_step(a, [proto.open_round(2, [a.id])[a.id]], 2)
    assert proto.replica(a).version == proto.replica(c).version == 1
    for (name, mine), (_, theirs) in zip(proto.replica(a).model.named_parameters(), new.items(), strict=True):
        assert torch.equal(mine, theirs), name


def test_counts_come_from_public_metadata_and_a_wrong_rate_is_refused(tmp_path: Path) -> None:
    fed = _federation(tmp_path, model="mlp", hidden_sizes=[8], norm="gn")
    proto: HeteroFL = fed.protocol  # type: ignore[assignment]
    party = fed.parties[0]
    down = proto.open_round(1, [party.id])
    reply = proto.client_step(party, [down[party.id]], 1)
    lying = reply.with_meta(rate=0.0625)
    with pytest.raises(ValueError, match="claims rate"):
        proto.server_step(1, [lying], fed.aggregator)


@pytest.mark.parametrize("family,shape", [("conv", (1, 8, 8)), ("mlp", (1, 8, 8)), ("mlp", (30,))])
def test_slicing_never_cuts_first_layer_inputs_or_classifier_outputs(family: str, shape: tuple[int, ...]) -> None:
    hidden = [6, 10]  # not powers of two, so ceil(r * h) differs from floor
    full = build_heterofl_model(family, shape, 10, hidden=hidden, rate=1.0)  # type: ignore[arg-type]
    for rate in (1.0, 0.5, 0.25, 0.125, 0.0625):
        sub = build_heterofl_model(family, shape, 10, hidden=hidden, rate=rate)  # type: ignore[arg-type]
        params = list(sub.named_parameters())
        first_weight = params[0][1]
        in_features = shape[0] if family == "conv" else int(np.prod(shape))
        assert first_weight.shape[1] == in_features, (rate, first_weight.shape)
        assert sub.classifier.weight.shape[0] == 10 and sub.classifier.bias.shape[0] == 10
        # Every hidden width is ceil(r * h), and every parameter is the top-left block of the global one.
        assert list(sub.widths) == [int(np.ceil(rate * h)) for h in hidden]
        if rate == 0.25:
            assert list(sub.widths) == [2, 3]
        for (name, p), (gname, g) in zip(params, full.named_parameters(), strict=True):
            assert name == gname
            assert all(a <= b for a, b in zip(p.shape, g.shape, strict=True))


def test_clients_train_the_top_left_slice_of_their_replica(tmp_path: Path) -> None:
    fed = _federation(tmp_path, norm="gn")
    proto: HeteroFL = fed.protocol  # type: ignore[assignment]
    down = proto.open_round(1, [p.id for p in fed.parties])
    for party in fed.parties:
        rate = down[party.id].meta["rate"]
        assert "weights" not in down[party.id].payload  # the server holds no model to slice
        g = dict(proto.replica(party).model.named_parameters())
        w = torch.cat([p.detach().reshape(-1) for p in proto.submodel(proto.replica(party), rate).parameters()])
        c1 = int(np.ceil(8 * rate))
        c2 = int(np.ceil(16 * rate))
        expected = torch.cat([
            g["body.0.weight"][:c1, :].reshape(-1), g["body.0.bias"][:c1],  # all input channels
            g["body.2.weight"][:c1], g["body.2.bias"][:c1],
            g["body.5.weight"][:c2, :c1].reshape(-1), g["body.5.bias"][:c2],
            g["body.7.weight"][:c2], g["body.7.bias"][:c2],
            g["classifier.weight"][:, :c2].reshape(-1), g["classifier.bias"],  # all 10 outputs
        ]).detach()
        assert torch.equal(w, expected), rate
    # Every participant starts from the same global model, derived from the run seed.
    first = proto.layout.flatten(proto.replica(fed.parties[0]).model)
    assert all(torch.equal(proto.layout.flatten(proto.replica(p).model), first) for p in fed.parties)


def test_submodel_has_the_expected_parameter_count_and_runs() -> None:
    def count(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    x = torch.randn(5, 1, 8, 8)
    # conv 1->4 (36+4), sBN 4 (8), conv 4->8 (288+8), sBN 8 (16), classifier 8->10 (80+10)
    half = build_heterofl_model("conv", (1, 8, 8), 10, hidden=[8, 16], rate=0.5)
    assert count(half) == 40 + 8 + 296 + 16 + 90
    # rate 1/16: widths ceil(8/16) = ceil(16/16) = 1
    tiny = build_heterofl_model("conv", (1, 8, 8), 10, hidden=[8, 16], rate=0.0625)
    assert count(tiny) == 10 + 2 + 10 + 2 + 20
    # mlp 64 -> ceil(8/4) = 2 (128+2), sBN 2 (4), classifier 2->10 (20+10)
    quarter = build_heterofl_model("mlp", (1, 8, 8), 10, hidden=[8], rate=0.25)
    assert count(quarter) == 130 + 4 + 30
    for model in (half, tiny, quarter):
        for training in (True, False):
            model.train(training)
            out = model(x)
            assert out.shape == (5, 10) and torch.isfinite(out).all()


def test_scaler_divides_by_the_rate_in_training_only() -> None:
    x = torch.randn(3, 4)
    scaler = Scaler(0.25)
    assert torch.allclose(scaler.train()(x), x * 4)
    assert torch.equal(scaler.eval()(x), x)
    # Inside a sub-model the Scaler divides by r / r_global and sits right after the conv.
    model = build_heterofl_model("conv", (1, 8, 8), 10, hidden=[8, 16], rate=0.25, global_rate=0.5)
    assert model.scaler_rate == 0.5
    conv, scaler_in_model = model.body[0], model.body[1]
    assert isinstance(scaler_in_model, Scaler)
    img = torch.randn(2, 1, 8, 8)
    model.train()
    assert torch.allclose(scaler_in_model(conv(img)), conv(img) / 0.5)
    model.eval()
    assert torch.equal(scaler_in_model(conv(img)), conv(img))
    # Without the reference's scale switch, no Scaler at all.
    plain = build_heterofl_model("conv", (1, 8, 8), 10, hidden=[8, 16], rate=0.25, scale=False)
    assert not any(isinstance(m, Scaler) for m in plain.modules())


def test_static_batch_norm_uses_batch_statistics_in_training_and_never_tracks_them() -> None:
    norm = StaticBatchNorm2d(3)
    x = 5 + 2 * torch.randn(8, 3, 4, 4)
    out = norm.train()(x)
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.equal(norm.running_mean, torch.zeros(3)) and torch.equal(norm.running_var, torch.ones(3))
    norm.running_mean.fill_(5.0)
    norm.running_var.fill_(4.0)
    assert torch.allclose(norm.eval()(x), (x - 5) / torch.sqrt(torch.tensor(4.0) + norm.eps), atol=1e-6)  # fused kernel
    # A single value per channel (a 1-record batch at a 1x1 map) must not crash training.
    assert torch.isfinite(norm.train()(torch.randn(1, 3, 1, 1))).all()


def test_batch_norm_models_are_refused_by_opacus_and_group_norm_models_are_not() -> None:
    bn = build_heterofl_model("conv", (1, 8, 8), 10, hidden=[8, 16], norm="bn")
    gn = build_heterofl_model("conv", (1, 8, 8), 10, hidden=[8, 16], norm="gn", rate=0.0625)
    # What the DP-SGD trainer wraps the model in (strict by default): sBN's buffers are refused.
    assert GradSampleModule.validate(bn, strict=False)
    with pytest.raises(NotImplementedError, match="buffers"):
        GradSampleModule(bn)
    assert GradSampleModule.validate(gn, strict=False) == []
    assert ModuleValidator.validate(gn, strict=False) == []


def _norm_inputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every sBN layer when ``model`` evaluates ``x``."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda _m, inp, name=name: seen.__setitem__(name, inp[0].detach()))
               for name, m in model.static_norms()]  # type: ignore[attr-defined]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def test_federated_sbn_statistics_equal_the_statistics_of_the_union_of_client_data(tmp_path: Path) -> None:
    raw = tiny_raw(protocol="heterofl", run={"rounds": 1, "participation": 0.67}, heterofl={**SMALL, "norm": "bn"})
    fed = Federation(parse_config(raw), tmp_path / "run", progress=False)
    fed.run()
    # Two of three clients trained; the statistics still cover every client's data (sbn_clients: all).
    assert len(fed.sample(1)) == 2
    proto: HeteroFL = fed.protocol  # type: ignore[assignment]
    union = torch.cat([p.train.x for p in fed.parties])
    replica = proto.replica(next(p for p in fed.parties if p.id in fed.sample(1)))
    assert replica.version == 1
    for rate in (1.0, 0.5, 0.25):
        model = replica.model if rate == 1.0 else proto.submodel(replica, rate)
        layers = dict(model.static_norms())
        assert len(layers) == 2
        for name, act in _norm_inputs(model, union).items():
            flat = act.double().transpose(0, 1).reshape(act.shape[1], -1)
            mean, var = flat.mean(dim=1), flat.var(dim=1, unbiased=False)
            torch.testing.assert_close(layers[name].running_mean.double(), mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(layers[name].running_var.double(), var, rtol=1e-4, atol=1e-5)
            # Not something one client's data would give: each silo's statistics differ from the union's.
            for party in fed.parties:
                own = _norm_inputs(model, party.train.x)[name].double()
                own_mean = own.transpose(0, 1).reshape(own.shape[1], -1).mean(dim=1)
                assert not torch.allclose(own_mean, mean, rtol=1e-3, atol=1e-4)


def test_sbn_statistics_over_a_capped_subset_are_those_of_the_union_of_the_subsets(tmp_path: Path) -> None:
    """sbn_max_records: each client sums over a fixed seeded subset of its records, the same every round."""
    raw = tiny_raw(protocol="heterofl", run={"rounds": 2}, heterofl={**SMALL, "norm": "bn", "sbn_max_records": 20})
    fed = Federation(parse_config(raw), tmp_path / "run", progress=False)
    fed.run()
    proto: HeteroFL = fed.protocol  # type: ignore[assignment]
    subsets = [proto.sbn_records(p) for p in fed.parties]
    assert all(len(s) == 20 and len(set(s.tolist())) == 20 for s in subsets)
    assert all(len(p.train) > 20 for p in fed.parties)  # so the cap bites
    assert all(torch.equal(s, proto.sbn_records(p)) for s, p in zip(subsets, fed.parties, strict=True))
    union = torch.cat([p.train.x[s] for p, s in zip(fed.parties, subsets, strict=True)])
    everything = torch.cat([p.train.x for p in fed.parties])
    replica = proto.replica(fed.parties[0])
    layers = dict(replica.model.static_norms())
    for name, act in _norm_inputs(replica.model, union).items():
        flat = act.double().transpose(0, 1).reshape(act.shape[1], -1)
        torch.testing.assert_close(layers[name].running_mean.double(), flat.mean(dim=1), rtol=1e-4, atol=1e-5)
        full = _norm_inputs(replica.model, everything)[name].double()
        full_mean = full.transpose(0, 1).reshape(full.shape[1], -1).mean(dim=1)
        assert not torch.allclose(full_mean, flat.mean(dim=1), rtol=1e-4, atol=1e-5)


def test_sbn_statistics_are_aggregated_as_sums_through_the_aggregator(tmp_path: Path) -> None:
    fed = _federation(tmp_path, norm="bn")
    calls: list[tuple[str, int]] = []
    real_sum = fed.aggregator.sum

    def spy(replies, field):  # type: ignore[no-untyped-def]
        calls.append((field, len(replies)))
        return real_sum(replies, field)

    fed.aggregator.sum = spy  # type: ignore[method-assign]
    fed.run()
    per_round = [c for c in calls if c[0] == "sbn_sums"]
    # 2 rounds x (3 levels x 2 norm layers), each a sum over all 3 clients; plus one padded_update sum per round.
    assert per_round == [("sbn_sums", 3)] * 12
    assert calls.count(("padded_update", 3)) == 2


def test_fixed_rates_follow_the_proportions_and_never_change(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    rates = fixed_rates(parse_proportions("a2-b8"), 10, gen)
    assert sorted(rates) == [0.5] * 8 + [1.0] * 2
    assert sorted(fixed_rates(parse_proportions("a1-b1-c1-d1-e1"), 5, gen)) == [0.0625, 0.125, 0.25, 0.5, 1.0]
    # Largest remainder: 5 clients at a2-b8 -> 1 at a, 4 at b (the reference would put all 5 at b).
    assert sorted(fixed_rates(parse_proportions("a2-b8"), 5, gen)) == [0.5, 0.5, 0.5, 0.5, 1.0]
    fed = _federation(tmp_path, mode="fixed")
    proto: HeteroFL = fed.protocol  # type: ignore[assignment]
    for party in fed.parties:
        assert len({proto.rate_of(party.id, r) for r in range(1, 8)}) == 1
    assert sorted(proto.rate_of(p.id, 1) for p in fed.parties) == [0.25, 0.5, 1.0]


def test_dynamic_mode_redraws_rates_every_round_deterministically(tmp_path: Path) -> None:
    def table(path: Path, seed: int) -> list[list[float]]:
        raw = tiny_raw(protocol="heterofl", run={"seed": seed},
                       heterofl={**SMALL, "mode": "dynamic", "proportions": "a1-b1-c1-d1-e1"})
        fed = Federation(parse_config(raw), path, progress=False)
        return [[fed.protocol.rate_of(p.id, r) for p in fed.parties] for r in range(1, 11)]  # type: ignore[attr-defined]

    a, b, other = table(tmp_path / "a", 3), table(tmp_path / "b", 3), table(tmp_path / "c", 4)
    assert a == b
    assert a != other
    for client in range(3):
        assert len({row[client] for row in a}) > 1  # a client's level changes across rounds
    assert {r for row in a for r in row} <= {1.0, 0.5, 0.25, 0.125, 0.0625}
    # The draw follows the proportions: "a3-e1" draws level a about three times as often as e.
    draws = dynamic_rates(parse_proportions("a3-e1"), 4000, torch.Generator().manual_seed(1))
    assert abs(draws.count(1.0) / 4000 - 0.75) < 0.03


def test_masked_cross_entropy_ignores_absent_classes() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 10, requires_grad=True)
    y = torch.tensor([2, 5, 5, 2, 2, 5])
    present = torch.tensor([2, 5])
    loss = masked_cross_entropy(logits, y, present)
    loss.backward()
    absent = [k for k in range(10) if k not in (2, 5)]
    assert torch.equal(logits.grad[:, absent], torch.zeros(6, 8))  # type: ignore[index]
    # The absent classes' logits do not matter at all...
    shifted = logits.detach().clone()
    shifted[:, absent] += 100 * torch.randn(6, 8)
    assert torch.allclose(masked_cross_entropy(shifted, y, present), loss)
    # ...they are the reference's constant 0, and the unmasked loss differs.
    by_hand = logits.detach().clone()
    by_hand[:, absent] = 0.0
    assert torch.allclose(loss, F.cross_entropy(by_hand, y))
    assert not torch.allclose(loss, F.cross_entropy(logits.detach(), y))


def test_learning_rate_follows_multistep_over_global_rounds(tmp_path: Path) -> None:
    fed = _federation(tmp_path, lr=0.1, milestones=[2, 4], lr_decay=0.5)
    lrs = [fed.protocol.learning_rate(r) for r in range(1, 6)]  # type: ignore[attr-defined]
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])


def test_bad_settings_are_refused_naming_the_field(tmp_path: Path) -> None:
    for bad in ("a2-f8", "a1-a1", "b0", "a-b"):
        with pytest.raises(ConfigError, match="heterofl.proportions"):
            parse_config(tiny_raw(protocol="heterofl", heterofl={"proportions": bad}))
    with pytest.raises(ConfigError, match="heterofl.hidden_sizes"):
        parse_config(tiny_raw(protocol="heterofl", heterofl={"hidden_sizes": [8, 0]}))
    raw = tiny_raw(protocol="heterofl", data={"dataset": "breast_cancer", "public_size": 0})
    from securefl.protocols import ProtocolSetupError

    with pytest.raises(ProtocolSetupError, match="model: mlp"):
        Federation(parse_config(raw), tmp_path / "run", progress=False)


def test_global_and_submodels_are_evaluated(tmp_path: Path) -> None:
    fed = _federation(tmp_path, norm="bn")
    summary = fed.run()
    assert summary["server"] == {}  # the server holds no model: each participant evaluates its replica
    assert sorted(p["rate"] for p in summary["participants"]) == [0.25, 0.5, 1.0]
    # Every participant holds the same global model after the last round, and ``accuracy`` is that model.
    (global_accuracy,) = {p["final_accuracy"] for p in summary["participants"]}
    assert 0.0 <= global_accuracy <= 1.0
    full = next(p for p in summary["participants"] if p["rate"] == 1.0)
    # The rate-1 client's sub-model is the global model itself.
    assert full["submodel_accuracy"] == global_accuracy


def test_pairwise_masking_sums_the_padded_slices_like_the_plain_aggregator(tmp_path: Path) -> None:
    """The padded-vector design lets a secure aggregator replace the plain sum (norm: gn)."""
    def global_after_one_round(path: Path, scheme: str) -> tuple[torch.Tensor, list[Any]]:
        raw = tiny_raw(protocol="heterofl", secure_aggregation=scheme, run={"rounds": 1},
                       heterofl={**SMALL, "norm": "gn"})
        transport = RecordingTransport()
        fed = Federation(parse_config(raw), path, progress=False, transport=transport)
        fed.run()
        sent = [m.payload["padded_update"] for m in transport.sent if m.kind == "padded_slice"]
        return fed.protocol.layout.flatten(fed.protocol.replica(fed.parties[0]).model), sent  # type: ignore[attr-defined]

    plain, plain_sent = global_after_one_round(tmp_path / "plain", "none")
    masked, masked_sent = global_after_one_round(tmp_path / "masked", "masking")
    assert len(masked_sent) == 3 and not any(isinstance(v, torch.Tensor) for v in masked_sent)  # sealed on the wire
    assert all(isinstance(v, torch.Tensor) for v in plain_sent)
    torch.testing.assert_close(masked, plain, rtol=0, atol=1e-4)  # up to the masking's fixed-point encoding


@pytest.mark.parametrize("scheme", ["masking", "ckks"])
def test_secure_aggregation_refuses_the_sbn_query_before_round_one(scheme: str, tmp_path: Path) -> None:
    raw = tiny_raw(protocol="heterofl", secure_aggregation=scheme, heterofl={**SMALL, "norm": "bn"})
    with pytest.raises(LayerSetupError, match="use heterofl.norm: gn"):
        Federation(parse_config(raw), tmp_path / "bn", progress=False)
    assert not (tmp_path / "bn" / "metrics.jsonl").exists()
    gn = tiny_raw(protocol="heterofl", secure_aggregation=scheme, heterofl={**SMALL, "norm": "gn"})
    Federation(parse_config(gn), tmp_path / "gn", progress=False)  # accepted


def _play(fed: Federation, proto: HeteroFL, rnd: int, sampled: list, lost: set) -> list:
    """One round by hand; the parties in ``lost`` never receive the round's broadcast."""
    down = proto.open_round(rnd, [p.id for p in sampled])
    replies = [proto.client_step(p, [down[p.id]], rnd) for p in sampled]
    broadcast = proto.server_step(rnd, replies, fed.aggregator)
    for party in sampled:
        if party.id not in lost:
            proto.client_update(party, [broadcast[party.id]], rnd)
    return replies


def _assert_same_replicas(proto: HeteroFL, mine: Any, theirs: Any) -> None:
    ours, reference = proto.replica(mine).model.state_dict(), proto.replica(theirs).model.state_dict()
    for name, value in reference.items():
        assert torch.equal(ours[name], value), name


def test_a_replica_never_skips_a_lost_update_and_is_sent_it_again(tmp_path: Path) -> None:
    """Round 1's update never reaches c; c sits out round 2; in round 3 its catch-up holds update 2 only.
    It must not apply 2 over 0 (its model would differ from everyone's for good): it stays at 0, trains
    from there, says so in its uplink, and the end of round 3 brings it 1, 2 and 3.

    No silo holds every class, so no update covers the whole classifier and none supersedes the others."""
    fed = _federation(tmp_path, partition=_class_partition([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8, 9],
                                                            [0, 1, 2, 7, 8, 9]]),
                      data={"public_size": 0, "val_fraction": 0.0}, norm="gn")
    proto: HeteroFL = fed.protocol  # type: ignore[assignment]
    a, b, c = fed.parties

    _play(fed, proto, 1, [a, b, c], lost={c.id})
    _play(fed, proto, 2, [a, b], lost=set())
    assert [proto.replica(p).version for p in (a, b, c)] == [2, 2, 0]
    assert [u.version for u in proto.log.updates] == [1, 2]  # c still lacks both
    assert not any(proto.supersedes(u) for u in proto.log.updates)
    replies = _play(fed, proto, 3, [a, b, c], lost=set())
    assert replies[2].meta["replica_version"] == 0  # c did not apply update 2 without update 1
    assert [proto.replica(p).version for p in (a, b, c)] == [3, 3, 3]
    _assert_same_replicas(proto, c, a)


def test_an_update_covering_every_element_lets_the_log_drop_the_updates_before_it(tmp_path: Path) -> None:
    """Every silo holds every class, so each round with the rate-1 client covers the whole model: its
    update alone sets the state. The log keeps no more than that update for a client that sits out, and
    the client, back after four rounds, reaches everyone's model from it alone."""
    fed = _federation(tmp_path, norm="gn")
    proto: HeteroFL = fed.protocol  # type: ignore[assignment]
    by_rate = {proto.rate_of(p.id, 1): p for p in fed.parties}
    full, half, quarter = by_rate[1.0], by_rate[0.5], by_rate[0.25]

    _play(fed, proto, 1, [full, half, quarter], lost={quarter.id})
    # Round 2 without the rate-1 client covers only the narrower slices: it supersedes nothing.
    _play(fed, proto, 2, [half], lost=set())
    assert [proto.supersedes(u) for u in proto.log.updates] == [True, False]
    assert [u.version for u in proto.log.updates] == [1, 2]
    for rnd in (3, 4, 5):
        _play(fed, proto, rnd, [full, half], lost=set())
        assert [u.version for u in proto.log.updates] == [rnd]  # the quarter client lacks only this one now
    down = proto.open_round(6, [quarter.id])[quarter.id]
    assert [u.version for u in read_updates(down)] == [5]
    reply = proto.client_step(quarter, [down], 6)
    assert reply.meta["replica_version"] == 5  # applied over the gap 0 -> 5
    _assert_same_replicas(proto, quarter, full)


def test_the_generic_log_and_replica_rules_for_superseding_updates() -> None:
    """UpdateLog and Replica without a protocol: an update the predicate marks as setting the whole state
    is applied over any gap, even after a skipped one, and the log drops what came before it (and only
    that); without the predicate nothing is ever dropped or applied over a gap."""
    from securefl.protocols.base import GlobalUpdate, Replica, UpdateLog

    def whole(update: GlobalUpdate) -> bool:
        return bool(update.meta.get("whole"))

    applied: list[int] = []
    replica = Replica()
    updates = [GlobalUpdate(v, v, {}, {"whole": v == 4}) for v in (2, 3, 4, 5)]  # 1 was lost
    replica.catch_up(updates, lambda _r, u: applied.append(u.version), "p", whole)
    assert applied == [4, 5] and replica.version == 5
    plain = Replica()
    plain.catch_up(updates, lambda _r, u: applied.append(u.version), "p")
    assert plain.version == 0 and applied == [4, 5]

    for predicate, kept in ((whole, [4, 5]), (None, [1, 2, 3, 4, 5])):
        log = UpdateLog(supersedes=predicate)
        for pid in ("here", "away"):
            log.register(pid)
        for v in range(1, 6):
            log.record(v, {}, {"whole": v == 4})
            log.delivered(["here"])
        assert [u.version for u in log.updates] == kept
        assert [u.version for u in log.missed("away")] == kept
