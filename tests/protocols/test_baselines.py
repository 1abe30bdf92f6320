"""Baselines as protocols: local-only, pooled and FedAvg."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from securefl.protocols import ProtocolSetupError
from securefl.protocols.base import flat_parameters
from securefl.runtime.federation import Federation
from tests.conftest import tiny_config
from tests.protocols.contract import ProtocolContract

SAME_MODELS = {"participants": [{"id": f"p{i}", "model": "cnn_s"} for i in range(3)]}


class TestLocalOnlyContract(ProtocolContract):
    protocol = "local_only"
    shares_nothing = True


class TestPooledContract(ProtocolContract):
    protocol = "pooled"
    shares_nothing = True


class TestFedAvgContract(ProtocolContract):
    protocol = "fedavg"
    overrides = SAME_MODELS


def test_fedavg_refuses_mixed_architectures_before_round_one(tmp_path: Path) -> None:
    with pytest.raises(ProtocolSetupError, match="same model"):
        Federation(tiny_config(protocol="fedavg"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_fedavg_global_model_is_the_sample_weighted_mean(tmp_path: Path) -> None:
    fed = Federation(tiny_config(protocol="fedavg", **SAME_MODELS), tmp_path / "run", progress=False)
    proto = fed.protocol
    ids = [p.id for p in fed.parties]
    assert proto.open_round(1, ids) is None  # every participant starts from the global initialisation
    replies = [proto.client_step(p, [], 1) for p in fed.parties]
    sizes = torch.tensor([float(p.num_samples) for p in fed.parties])
    expected = sum(w * r.tensor("weights") for w, r in zip(sizes / sizes.sum(), replies, strict=True))
    down = proto.server_step(1, replies, fed.aggregator)
    torch.testing.assert_close(flat_parameters(proto.global_model), expected)
    torch.testing.assert_close(down.tensor("weights"), expected)  # the round ends with the model at the clients


def test_fedavg_uniform_weighting_takes_the_plain_mean_and_sends_no_count(tmp_path: Path) -> None:
    fed = Federation(tiny_config(protocol="fedavg", fedavg={"weighting": "uniform"}, **SAME_MODELS), tmp_path / "run",
                     progress=False)
    proto = fed.protocol
    replies = [proto.client_step(p, [], 1) for p in fed.parties]
    assert all(not r.meta for r in replies)  # no record count, no aggregation weight
    proto.server_step(1, replies, fed.aggregator)
    expected = torch.stack([r.tensor("weights") for r in replies]).mean(dim=0)
    torch.testing.assert_close(flat_parameters(proto.global_model), expected)


def test_fedavg_catches_up_a_participant_that_missed_a_round(tmp_path: Path) -> None:
    fed = Federation(tiny_config(protocol="fedavg", **SAME_MODELS), tmp_path / "run", progress=False)
    proto, (p0, p1, p2) = fed.protocol, fed.parties
    proto.server_step(1, [proto.client_step(p, [], 1) for p in (p0, p1, p2)], fed.aggregator)
    proto.server_step(2, [proto.client_step(p, [], 2) for p in (p0, p1)], fed.aggregator)  # p2 not sampled
    catch_up = proto.open_round(3, [p0.id, p1.id, p2.id])
    assert set(catch_up) == {p2.id}
    torch.testing.assert_close(catch_up[p2.id].tensor("weights"), flat_parameters(proto.global_model))


def test_pooled_trains_one_model_per_architecture(tmp_path: Path) -> None:
    cfg = tiny_config(protocol="pooled", participants=[
        {"id": "a", "model": "cnn_s"}, {"id": "b", "model": "cnn_s"}, {"id": "c", "model": "mlp_s"}])
    fed = Federation(cfg, tmp_path / "run", progress=False)
    a, b, c = fed.parties
    assert a.model is b.model and a.model is not c.model


def test_local_only_never_sends_anything_and_keeps_the_validation_best(tmp_path: Path) -> None:
    fed = Federation(tiny_config(protocol="local_only", run={"rounds": 3}), tmp_path / "run", progress=False)
    fed.run()
    for party in fed.parties:
        best = party.state["best_model"]
        for key, value in party.model.state_dict().items():
            assert torch.equal(value, best[key])


def test_local_only_reports_its_model_on_the_owners_label_distribution(tmp_path: Path) -> None:
    """The personalised yardstick FML's local model is compared with: per-class test accuracy weighted by the
    owner's own label shares, and withheld from a DP run (owner-only)."""
    from securefl.core.training import accuracy

    fed = Federation(tiny_config(protocol="local_only"), tmp_path / "run", progress=False)
    party = fed.parties[0]
    metrics = fed.protocol.evaluate(party)
    x, y = fed.ctx.test_x, fed.ctx.test_y
    counts = party.train.label_counts(fed.ctx.num_classes).float()
    per_class = torch.tensor([accuracy(party.model, x[y == c], y[y == c]) if bool((y == c).any()) else 0.0
                              for c in range(fed.ctx.num_classes)])
    seen = torch.tensor([float((y == c).any()) for c in range(fed.ctx.num_classes)])
    weights = counts * seen
    assert metrics["own_distribution_accuracy"] == pytest.approx(float((per_class * weights).sum() / weights.sum()))
    assert metrics["accuracy"] == accuracy(party.model, x, y)
    assert "own_distribution_accuracy" in fed.protocol.owner_only_metrics
