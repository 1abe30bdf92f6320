"""Dataset loaders: real files when present, clear errors when not, never a download."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from securefl.data.datasets import (
    FASHION_MNIST_DEFAULT_DIR,
    DataError,
    load_breast_cancer,
    load_digits,
    load_fashion_mnist,
    read_idx,
)


def test_digits_is_split_deterministically() -> None:
    a, b = load_digits(seed=0), load_digits(seed=0)
    assert a.x_train.shape[1:] == (1, 8, 8) and a.num_classes == 10
    assert len(a.x_train) + len(a.x_test) == 1797
    assert (a.y_train == b.y_train).all()


def test_breast_cancer_is_tabular() -> None:
    ds = load_breast_cancer()
    assert ds.input_shape == (30,) and ds.num_classes == 2
    assert len(ds.x_train) + len(ds.x_test) == 569


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_fashion_mnist(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "apt-get install dataset-fashion-mnist" in message
    assert "train-images-idx3-ubyte.gz" in message


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_round_trips_and_detects_truncation(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    _write_idx(tmp_path / "ok.gz", images)
    assert np.array_equal(read_idx(tmp_path / "ok.gz"), images)
    raw = gzip.open(tmp_path / "ok.gz").read()
    with gzip.open(tmp_path / "short.gz", "wb") as handle:
        handle.write(raw[:-5])
    with pytest.raises(DataError, match="short.gz: expected 24 data bytes"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "junk.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="junk.gz"):
        read_idx(tmp_path / "junk.gz")


def test_fashion_mnist_from_a_directory_of_idx_files(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (20, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 20))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (5, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 5))
    monkeypatch.setenv("SECUREFL_DATA", str(tmp_path))
    ds = load_fashion_mnist()
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)


@pytest.mark.skipif(not Path(FASHION_MNIST_DEFAULT_DIR, "train-images-idx3-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist not installed (CI installs it)")
def test_real_fashion_mnist() -> None:
    ds = load_fashion_mnist()
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert sorted(np.unique(ds.y_test.numpy()).tolist()) == list(range(10))
