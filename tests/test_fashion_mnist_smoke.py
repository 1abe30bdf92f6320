"""Slow: FedMD on real Fashion-MNIST, end to end, so CI catches a protocol broken on real data."""

from __future__ import annotations

from pathlib import Path

import pytest

from securefl.data.datasets import FASHION_MNIST_DEFAULT_DIR
from securefl.runtime.federation import Federation
from tests.conftest import tiny_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(FASHION_MNIST_DEFAULT_DIR, "train-images-idx3-ubyte.gz").exists(),
                       reason="dataset-fashion-mnist not installed"),
]


def test_fedmd_smoke_on_fashion_mnist(tmp_path: Path) -> None:
    cfg = tiny_config(
        run={"rounds": 2},
        data={"dataset": "fashion_mnist", "max_train_records": 6000, "public_size": 1000},
        participants=[{"id": f"p{i}", "model": m} for i, m in enumerate(["cnn_s", "mlp_m", "deepcnn_s", "resnet_s"])],
        fedmd={"alignment_size": 1000, "transfer_max_epochs": 5},
    )
    summary = Federation(cfg, tmp_path / "run", progress=False).run()
    assert summary["mean_accuracy"] > 0.4, summary
