"""HeteroFL after issue 20: the global model as headline, GroupNorm with the same group size at every width,
a step budget, dynamic rates, and no warm start."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from securefl.config import ConfigError, parse_config
from securefl.core.training import accuracy
from securefl.models.heterofl import build_heterofl_model, channels_per_group
from securefl.protocols.heterofl import HeteroFL, HeteroFLConfig
from securefl.runtime.federation import Federation
from tests.conftest import tiny_raw

SMALL = {"hidden_sizes": [8, 16], "local_epochs": 1, "batch_size": 32, "proportions": "a1-b1-c1"}


def _federation(tmp_path: Path, rounds: int = 2, **heterofl: Any) -> Federation:
    raw = tiny_raw(protocol="heterofl", run={"rounds": rounds}, heterofl={**SMALL, **heterofl})
    return Federation(parse_config(raw), tmp_path / "run", progress=False)


def _group_norms(model: nn.Module) -> list[nn.GroupNorm]:
    return [m for m in model.modules() if isinstance(m, nn.GroupNorm)]


# ----- GroupNorm: the same channels per group at every width --------------------------------------------
def test_a_channel_slice_is_group_normalised_as_in_the_global_model() -> None:
    """With 32 channels at full width and 4 at rate 1/8, the reference's GroupNorm(4, C) puts 8 channels in a
    group at full width and 1 in the thin model: channels 0-3 would be normalised differently. With 4 channels
    per group at every width, the thin model's 4 channels are exactly the global model's first group."""
    hidden, rates = [32, 64], [1.0, 0.5, 0.25, 0.125]
    per_group = channels_per_group("conv", hidden, rates)
    assert per_group == 4  # the gcd of 32, 64, 16, 32, 8, 16, 4, 8
    wide = build_heterofl_model("conv", (1, 8, 8), 10, hidden=hidden, norm="gn", gn_channels_per_group=per_group)
    thin = build_heterofl_model("conv", (1, 8, 8), 10, hidden=hidden, rate=0.125, norm="gn",
                                gn_channels_per_group=per_group)
    for g, s in zip(_group_norms(wide), _group_norms(thin), strict=True):
        assert g.num_channels // g.num_groups == s.num_channels // s.num_groups == 4
        with torch.no_grad():  # non-trivial affine parameters, sliced as the protocol slices them
            g.weight.uniform_(0.5, 2.0)
            g.bias.uniform_(-1.0, 1.0)
            s.weight.copy_(g.weight[:s.num_channels])
            s.bias.copy_(g.bias[:s.num_channels])
        x = torch.randn(5, g.num_channels, 4, 4) * torch.linspace(0.1, 5.0, g.num_channels).view(1, -1, 1, 1)
        torch.testing.assert_close(s(x[:, :s.num_channels]), g(x)[:, :s.num_channels])


def test_the_protocol_builds_every_level_with_one_group_size(tmp_path: Path) -> None:
    fed = _federation(tmp_path, hidden_sizes=[16, 32], norm="gn")  # a-c: widths 16, 32, 8, 16, 4, 8
    proto: HeteroFL = fed.protocol  # type: ignore[assignment]
    sizes = {gn.num_channels // gn.num_groups for rate in (1.0, 0.5, 0.25) for gn in _group_norms(proto._build(rate))}
    assert sizes == {4}


def test_a_group_size_that_does_not_divide_a_width_is_refused_naming_the_field() -> None:
    # [32, 64] at a-d: the rate-1/8 model's first layer has 4 channels, which 8 does not divide.
    raw = tiny_raw(protocol="heterofl", heterofl={"hidden_sizes": [32, 64], "proportions": "a1-d1", "norm": "gn",
                                                  "gn_channels_per_group": 8})
    with pytest.raises(ConfigError, match=r"heterofl.gn_channels_per_group = 8 does not divide the width 4"):
        parse_config(raw)
    raw["heterofl"]["gn_channels_per_group"] = 4
    assert parse_config(raw).protocol_config().group_size() == 4  # type: ignore[attr-defined]
    # Under norm: bn the setting has no layer to apply to, so no width is checked.
    raw["heterofl"].update(norm="bn", gn_channels_per_group=8)
    parse_config(raw)


def test_an_mlp_whose_widths_leave_one_channel_per_group_is_refused() -> None:
    """A GroupNorm over (N, C) with one value per group outputs its bias alone: the layer would learn nothing."""
    raw = tiny_raw(protocol="heterofl", heterofl={"model": "mlp", "hidden_sizes": [16], "proportions": "a1-e1",
                                                  "norm": "gn"})  # widths 16 and 1
    with pytest.raises(ConfigError, match="heterofl.gn_channels_per_group = 1 with model: mlp"):
        parse_config(raw)
    assert HeteroFLConfig(model="mlp", hidden_sizes=[16], proportions="a1-c1", norm="gn").group_size() == 4


# ----- one meaning of accuracy: the global model --------------------------------------------------------
def test_accuracy_is_the_global_model_and_the_submodel_is_reported_beside_it(tmp_path: Path) -> None:
    fed = _federation(tmp_path, norm="bn")
    fed.run()
    proto: HeteroFL = fed.protocol  # type: ignore[assignment]
    ctx = proto.ctx
    seen_rates = set()
    for party in fed.parties:
        replica = proto.replica(party)
        metrics = proto.evaluate(party)
        rate = metrics["rate"]
        seen_rates.add(rate)
        assert set(metrics) == {"accuracy", "rate", "submodel_accuracy", "submodel_local_accuracy"}
        assert metrics["accuracy"] == accuracy(replica.model, ctx.test_x, ctx.test_y, classes=ctx.eval_classes)
        sub = proto.submodel(replica, rate)
        assert metrics["submodel_accuracy"] == accuracy(sub, ctx.test_x, ctx.test_y, classes=ctx.eval_classes)
    assert seen_rates == {1.0, 0.5, 0.25}
    # Every participant holds the same global model: the mean of accuracy is the global model's accuracy.
    assert len({proto.evaluate(p)["accuracy"] for p in fed.parties}) == 1
    # The thin sub-models are different models from the global one.
    assert any(proto.evaluate(p)["submodel_accuracy"] != proto.evaluate(p)["accuracy"] for p in fed.parties)


# ----- dynamic mode -------------------------------------------------------------------------------------
def test_dynamic_mode_runs_redraws_rates_and_reports_the_global_model(tmp_path: Path) -> None:
    fed = _federation(tmp_path, norm="gn", mode="dynamic")
    proto: HeteroFL = fed.protocol  # type: ignore[assignment]
    summary = fed.run()
    draws = {p.id: (proto.rate_of(p.id, 1), proto.rate_of(p.id, 2)) for p in fed.parties}
    assert any(r1 != r2 for r1, r2 in draws.values()), draws  # re-drawn between rounds
    # Each participant's metrics carry the rate of the round that made its replica (round 2).
    assert {p["id"]: p["rate"] for p in summary["participants"]} == {pid: r2 for pid, (_, r2) in draws.items()}
    (global_accuracy,) = {p["final_accuracy"] for p in summary["participants"]}
    replica = proto.replica(fed.parties[0])
    ctx = proto.ctx
    assert global_accuracy == accuracy(replica.model, ctx.test_x, ctx.test_y, classes=ctx.eval_classes)
    assert summary["mean_accuracy"] == pytest.approx(global_accuracy)


# ----- local schedule: epochs, or a fixed number of steps -----------------------------------------------
class CountingTrainer:
    """Delegates to the party's trainer and records how many minibatch steps each fit took."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.steps = inner, []

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        stats = self.inner.fit(*args, **kwargs)
        self.steps.append(stats.steps)
        return stats


@pytest.mark.parametrize("local_steps", [None, 7])
def test_local_steps_replace_the_epochs(tmp_path: Path, local_steps: int | None) -> None:
    fed = _federation(tmp_path, rounds=1, norm="gn", local_epochs=2, batch_size=10, local_steps=local_steps)
    proto: HeteroFL = fed.protocol  # type: ignore[assignment]
    for party in fed.parties:
        party.trainer = CountingTrainer(party.trainer)  # type: ignore[assignment]
    fed.run()
    for party in fed.parties:
        expected = 2 * math.ceil(len(party.train.x) / 10) if local_steps is None else local_steps
        assert party.trainer.steps == [expected]  # type: ignore[attr-defined]
        plan = proto.private_training_plan(party)
        assert plan == ([(10, 2, None)] if local_steps is None else [(10, None, 7)])
    assert len({len(p.train.x) for p in fed.parties}) > 1  # silos of different sizes, same step count


# ----- warm start ---------------------------------------------------------------------------------------
def test_warm_start_is_refused_because_the_global_model_overwrites_the_clients(tmp_path: Path) -> None:
    proto: HeteroFL = _federation(tmp_path, norm="gn").protocol  # type: ignore[assignment]
    reason = proto.warm_start_refusal()
    assert reason is not None and "global model" in reason


def test_the_global_model_is_scored_once_per_distinct_model(tmp_path: Path) -> None:
    """Identical replicas share one score; a replica that differs in one value is scored on its own."""
    fed = _federation(tmp_path, rounds=1, norm="bn")
    fed.run()
    proto: HeteroFL = fed.protocol  # type: ignore[assignment]
    ctx = proto.ctx
    a, b = fed.parties[0], fed.parties[1]
    before = proto.evaluate(a)["accuracy"]
    assert proto.evaluate(b)["accuracy"] == before
    # A class whose share of the test set differs from that score; b's replica then predicts it everywhere.
    share = torch.bincount(ctx.test_y, minlength=10).float() / len(ctx.test_y)
    k = int((share - before).abs().argmax())
    with torch.no_grad():
        proto.replica(b).model.classifier.bias.copy_(1e4 * F.one_hot(torch.tensor(k), 10).float())
    changed = proto.evaluate(b)["accuracy"]
    assert changed == accuracy(proto.replica(b).model, ctx.test_x, ctx.test_y, classes=ctx.eval_classes)
    assert changed == pytest.approx(float(share[k])) and changed != before
    assert proto.evaluate(a)["accuracy"] == before


# ----- sBN statistics: only where a round is evaluated ----------------------------------------------------
def test_sbn_statistics_are_computed_only_in_evaluated_rounds_and_change_no_score(tmp_path: Path,
                                                                                 monkeypatch: Any) -> None:
    """Statistics serve evaluation alone (training normalises with batch statistics): a run evaluated every
    second round skips the query in round 1, and its round-2 scores equal those of a run that queried in both."""
    import json

    queried: list[int] = []
    original = HeteroFL._federated_sbn_statistics

    def recording(self: HeteroFL, rnd: int, *args: Any) -> Any:
        queried.append(rnd)
        return original(self, rnd, *args)

    monkeypatch.setattr(HeteroFL, "_federated_sbn_statistics", recording)

    def run(name: str, eval_every: int) -> dict[int, Any]:
        raw = tiny_raw(protocol="heterofl", run={"rounds": 3, "eval_every": eval_every},
                       heterofl={**SMALL, "norm": "bn"})
        queried.clear()
        Federation(parse_config(raw), tmp_path / name, progress=False).run()
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return {json.loads(line)["round"]: json.loads(line)["participants"] for line in lines}

    sparse = run("sparse", 2)
    assert queried == [2, 3]  # the last round is always evaluated
    dense = run("dense", 1)
    assert queried == [1, 2, 3]
    assert sorted(sparse) == [0, 2, 3]
    for rnd in (2, 3):
        assert sparse[rnd] == dense[rnd]
