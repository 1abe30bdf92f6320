"""securefl as a library: participants from a site's own arrays and torch Datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from securefl import api


@pytest.fixture(scope="module")
def cancer():
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = np.sign(bunch.data) * np.log1p(np.abs(bunch.data))
    x = ((x - x[:80].mean(0)) / x[:80].std(0)).astype(np.float32)  # public rows' statistics only
    return x, bunch.target


def test_train_from_arrays_and_a_torch_dataset_returns_models_and_ledgers(cancer, tmp_path: Path) -> None:
    x, y = cancer
    sites = [
        api.Participant.from_table("site_a", x[80:260], y[80:260], model="mlp_m", target_epsilon=4.0, lr=0.05),
        api.Participant.from_dataset("site_b", TensorDataset(torch.from_numpy(x[260:420]), torch.from_numpy(y[260:420])),
                                     model="mlp_s", target_epsilon=8.0),
    ]
    result = api.train(sites, test=(x[420:], y[420:]), public=x[:80], protocol="fedmd", rounds=2,
                       privacy_unit="record", secure_aggregation="ckks", out=tmp_path / "run",
                       training={"optimizer": "sgd", "lr": 0.1, "batch_size": 32, "local_epochs": 2},
                       protocol_options={"alignment_size": 80, "transfer_max_epochs": 2})
    assert set(result.models) == {"site_a", "site_b"}
    with torch.no_grad():
        predictions = result.models["site_a"](torch.from_numpy(x[420:])).argmax(1).numpy()
    # The returned model is the trained one: its accuracy is what the run reported for it.
    reported = next(p for p in result.summary["participants"] if p["id"] == "site_a")["final_accuracy"]
    assert float((predictions == y[420:]).mean()) == pytest.approx(reported, abs=1e-6)
    assert set(result.ledgers) == {"site_a", "site_b"} and all(p.exists() for p in result.ledgers.values())
    assert result.audit().ok
    eps = {p["id"]: p["epsilon"] for p in result.summary["participants"]}
    assert 0 < eps["site_a"] <= 4.0 and 0 < eps["site_b"] <= 8.0
    # site_a's own rate reaches the run's config; site_b trains at training.lr.
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["participants"]
    assert [p.get("lr") for p in saved] == [0.05, None]


def test_bad_site_data_is_named(cancer, tmp_path: Path) -> None:
    x, y = cancer
    bad = y[80:200].copy()
    bad[3] = 7
    # The record is named by its index, never by its value: a node's errors may cross to the coordinator.
    with pytest.raises(api.DataError, match=r"participant 'site_a': record 3 has a label outside the configured "
                                            r"classes 0\.\.1"):
        api.train([api.Participant.from_table("site_a", x[80:200], bad, model="mlp_s")],
                  test=(x[420:], y[420:]), num_classes=2, out=tmp_path / "run", protocol="local_only", rounds=1)
    with pytest.raises(api.DataError, match="participant 'site_b'.*features"):
        api.train([api.Participant.from_table("site_a", x[80:200], y[80:200], model="mlp_s"),
                   api.Participant.from_table("site_b", x[200:300, :20], y[200:300], model="mlp_s")],
                  test=(x[420:], y[420:]), out=tmp_path / "run2", protocol="local_only", rounds=1)
    with pytest.raises(api.ConfigError, match=r"participants\.0\.lr.*greater than 0"):
        api.train([api.Participant.from_table("site_a", x[80:200], y[80:200], model="mlp_s", lr=0.0)],
                  test=(x[420:], y[420:]), out=tmp_path / "run4", protocol="local_only", rounds=1)
    with pytest.raises(api.ConfigError, match="target_epsilon"):
        api.train([api.Participant.from_table("site_a", x[80:200], y[80:200], model="mlp_s")],
                  test=(x[420:], y[420:]), out=tmp_path / "run3", privacy_unit="record")
