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
    down = proto.open_round(1, ids)
    replies = [proto.client_step(p, [down], 1) for p in fed.parties]
    sizes = torch.tensor([float(p.num_samples) for p in fed.parties])
    expected = sum(w * r.tensor("weights") for w, r in zip(sizes / sizes.sum(), replies, strict=True))
    proto.server_step(1, replies, fed.aggregator)
    torch.testing.assert_close(flat_parameters(proto.global_model), expected)


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
