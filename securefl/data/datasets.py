"""Datasets: the embedded digits default, Fashion-MNIST from IDX files, breast cancer.

Every loader returns a :class:`Dataset` of float32 features and int64 labels,
already split into train and test. Nothing is ever downloaded: securefl runs in
hospitals and CI machines without internet, so a missing file is an error that
says where the files were looked for and how to get them.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


class DataError(ValueError):
    """A dataset is missing, corrupt or inconsistent. The message names the file."""


@dataclass(frozen=True)
class Dataset:
    """A train/test pair of tensors. Participants hold index views, never copies."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_digits(*, seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """The 8x8 digits bundled with scikit-learn (1,797 images), split stratified by ``seed``."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    # Centre the pixels so that small models train quickly; a fixed constant, not a data statistic.
    x = (x - 0.5) / 0.5
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = _stratified_split(y, test_fraction, seed)
    return _make("digits", x, y, train_idx, test_idx, 10)


def load_breast_cancer(*, seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """Breast cancer Wisconsin (569 records, 30 features), bundled with scikit-learn.

    Features are log-scaled with a fixed transform (``sign(x) * log1p(|x|)``) rather
    than standardised with statistics of the pooled data, which no silo could compute.
    """
    from sklearn.datasets import load_breast_cancer as sk_load

    bunch = sk_load()
    x = bunch.data.astype(np.float32)
    x = np.sign(x) * np.log1p(np.abs(x))
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = _stratified_split(y, test_fraction, seed)
    return _make("breast_cancer", x, y, train_idx, test_idx, 2)


def resolve_fashion_mnist_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """``data_dir``, else ``$SECUREFL_DATA``, else the Debian package's directory."""
    if data_dir:
        return Path(data_dir)
    if os.environ.get("SECUREFL_DATA"):
        return Path(os.environ["SECUREFL_DATA"])
    return Path(FASHION_MNIST_DEFAULT_DIR)


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Fashion-MNIST (60k train / 10k test, 28x28) from the four standard IDX ``.gz`` files."""
    root = resolve_fashion_mnist_dir(data_dir)
    missing = [name for name in FASHION_MNIST_FILES.values() if not (root / name).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST files not found in {root} (missing: {', '.join(missing)}). "
            f"On Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` (installs them in "
            f"{FASHION_MNIST_DEFAULT_DIR}); or point --data-dir / SECUREFL_DATA at a directory "
            "holding the four *-ubyte.gz files. securefl never downloads data."
        )
    x_train = _images(root / FASHION_MNIST_FILES["train_images"])
    y_train = _labels(root / FASHION_MNIST_FILES["train_labels"], len(x_train), root / FASHION_MNIST_FILES["train_images"])
    x_test = _images(root / FASHION_MNIST_FILES["test_images"])
    y_test = _labels(root / FASHION_MNIST_FILES["test_labels"], len(x_test), root / FASHION_MNIST_FILES["test_images"])

    def normalise(images: np.ndarray) -> np.ndarray:
        # Fixed constants (the published mean/std of Fashion-MNIST), not pooled statistics.
        return ((images.astype(np.float32) / 255.0 - 0.2860) / 0.3530)[:, None, :, :]

    return Dataset(
        name="fashion_mnist",
        x_train=torch.from_numpy(normalise(x_train)),
        y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_test=torch.from_numpy(normalise(x_test)),
        y_test=torch.from_numpy(y_test.astype(np.int64)),
        num_classes=10,
    )


def _images(path: Path) -> np.ndarray:
    images = read_idx(path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{path}: expected N x 28 x 28 Fashion-MNIST images, found shape {images.shape}")
    return images


def _labels(path: Path, count: int, images: Path) -> np.ndarray:
    labels = read_idx(path)
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(f"{path}: expected {count} labels (one per image of {images.name}), found shape {labels.shape}")
    if len(labels) and int(labels.max()) > 9:
        at = int(np.argmax(labels > 9))
        raise DataError(f"{path}: label {int(labels[at])} at index {at} is outside the 10 Fashion-MNIST classes 0..9")
    return labels


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped), checking its header against its size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(raw) < 4:
        raise DataError(f"{path}: file too short to be an IDX file ({len(raw)} bytes)")
    zero, dtype_code, ndim = raw[0] * 256 + raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = int(np.prod(dims))
    if len(raw) - header_len != expected:
        raise DataError(f"{path}: expected {expected} data bytes for shape {dims}, found {len(raw) - header_len}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def load_dataset(name: str, *, seed: int = 0, data_dir: str | None = None) -> Dataset:
    if name == "digits":
        return load_digits(seed=seed)
    if name == "breast_cancer":
        return load_breast_cancer(seed=seed)
    if name == "fashion_mnist":
        return load_fashion_mnist(data_dir)
    raise DataError(f"unknown dataset {name!r}; allowed: digits, fashion_mnist, breast_cancer")


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
    return np.sort(train_idx), np.sort(test_idx)


def _make(name: str, x: np.ndarray, y: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray,
          num_classes: int) -> Dataset:
    return Dataset(
        name=name,
        x_train=torch.from_numpy(np.ascontiguousarray(x[train_idx])),
        y_train=torch.from_numpy(y[train_idx]),
        x_test=torch.from_numpy(np.ascontiguousarray(x[test_idx])),
        y_test=torch.from_numpy(y[test_idx]),
        num_classes=num_classes,
    )
