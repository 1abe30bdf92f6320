"""The DP learning-rate grid's plumbing: which rate it picks, and that a stopped grid loses nothing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from securefl.data.datasets import Dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def dp_lr(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("dp_lr_benchmark", ROOT / "benchmarks" / "dp_lr.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    # No real training or data here: a fake image set, and a "training" whose curve encodes what it was asked.
    fake = Dataset("fake", torch.zeros(20_000, 1, 2, 2), torch.zeros(20_000, dtype=torch.long),
                   torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long), 10)
    monkeypatch.setattr("securefl.data.datasets.load_fashion_mnist", lambda data_dir=None: fake)
    module.trained = []

    def fake_train(label, kind, lr, momentum, *, train, val, epsilon, epochs, batch_size, seed, model_name):
        module.trained.append((model_name, epsilon, lr))
        final = 0.5 + (0.1 if (lr == 0.01) == (model_name.startswith("mlp") and epsilon <= 2) else 0.0)
        return {"setting": label, "model": model_name, "optimizer": kind, "lr": lr, "momentum": momentum,
                "epsilon": epsilon, "noise_multiplier": 1.0, "val_curve": [0.9, final], "val_final": final,
                "epochs": epochs, "records": len(train[0]), "seed": seed}

    monkeypatch.setattr(module, "train_one", fake_train)
    yield module
    del sys.modules[spec.name]


def test_the_best_setting_is_judged_on_the_last_epoch_not_the_peak(dp_lr):
    peaks_then_collapses = {"model": "mlp_l", "epsilon": 1.0, "lr": 0.05, "val_curve": [0.6, 0.13], "val_final": 0.13}
    steady = {"model": "mlp_l", "epsilon": 1.0, "lr": 0.01, "val_curve": [0.4, 0.5], "val_final": 0.5}
    assert dp_lr.best_settings([peaks_then_collapses, steady])[("mlp_l", 1.0)] is steady


GRID = ["--model", "cnn_s", "mlp_l", "--epsilon", "1", "8", "--settings", "msgd0.01", "msgd0.05",
        "--epochs", "3", "--records", "500", "--out-name", "grid"]


def test_a_grid_names_each_cases_best_rate_and_a_rerun_reuses_every_finished_training(dp_lr, tmp_path):
    assert dp_lr.main(GRID) == 0
    assert len(dp_lr.trained) == 8
    rows = json.loads((tmp_path / "grid.json").read_text())["rows"]
    assert {(m, e): r["lr"] for (m, e), r in dp_lr.best_settings(rows).items()} == {
        ("cnn_s", 1.0): 0.05, ("cnn_s", 8.0): 0.05, ("mlp_l", 1.0): 0.01, ("mlp_l", 8.0): 0.05}
    table = (tmp_path / "grid.md").read_text()
    assert "| mlp_l | 1 | momentum SGD 0.01 | 60.0 |" in table
    assert (tmp_path / "grid.png").stat().st_size > 10_000

    dp_lr.trained.clear()
    assert dp_lr.main(GRID) == 0
    assert dp_lr.trained == []  # every training reused
    dp_lr.main([arg if arg != "3" else "4" for arg in GRID])  # 4 epochs: another experiment, retrained
    assert len(dp_lr.trained) == 8


def test_a_stopped_grid_keeps_what_it_measured(dp_lr, tmp_path, monkeypatch):
    real = dp_lr.train_one

    def dies_on_the_third(*args, **kwargs):
        if len(dp_lr.trained) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dp_lr, "train_one", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        dp_lr.main(GRID)
    assert len(json.loads((tmp_path / "grid.json").read_text())["rows"]) == 2
    monkeypatch.setattr(dp_lr, "train_one", real)
    dp_lr.trained.clear()
    dp_lr.main(GRID)
    assert len(dp_lr.trained) == 6  # only what was missing


def test_a_model_outside_the_zoo_is_named(dp_lr, capsys):
    with pytest.raises(SystemExit):
        dp_lr.main(["--model", "cnn_s", "vgg19"])
    assert "--model 'vgg19': not in the zoo" in capsys.readouterr().err
