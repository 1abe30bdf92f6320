"""Data the owners bring: one table per participant, read where the owner keeps it.

A table is float32 features plus int64 labels. It comes from a CSV file
(``data.dataset = files``: each participant's ``data_file``, and the shared
``test_file`` and ``public_file``) or from code (:mod:`securefl.api`: a numpy
array, a pandas DataFrame or a torch ``Dataset``). Every check names the
participant and the file, line or column at fault, before any training starts,
and never quotes what the file holds: on a deployed node these messages go
back to the coordinator, and a line of an owner's table is private data.

On a deployed node only the node's own table is read: the other participants
are known by id and model, never by their data.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from securefl.core.seeding import derive_seed
from securefl.data.datasets import DataError, Dataset
from securefl.data.partition import FederatedSplit, PartySplit, train_val_split


@dataclass(frozen=True)
class Table:
    x: np.ndarray  # (n, features) float32
    y: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.y)


def read_csv_table(path: str | Path, *, label_column: str, what: str) -> Table:
    """A CSV with a header row; ``label_column`` holds integer labels, every other column a number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what}: {path} does not exist (securefl never downloads data; check the path)")
    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        # The type only: a decoder's or CSV parser's message can quote the bytes it choked on.
        raise DataError(f"{what}: {path} is not a readable CSV file ({type(exc).__name__})") from None
    if not rows:
        raise DataError(f"{what}: {path} is empty (no header row)")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    if label_column not in header:
        # Not the header itself: it is the file's first line (whatever file the path names).
        raise DataError(f"{what}: {path} has no label column {label_column!r} (its header row has {len(header)} "
                        "columns; check data.files.label_column against it)")
    label_at = header.index(label_column)
    features = [i for i in range(len(header)) if i != label_at]
    x = np.empty((len(body), len(features)), dtype=np.float32)
    y = np.empty(len(body), dtype=np.int64)
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"{what}: {path} line {line} has {len(row)} fields, the header has {len(header)}")
        try:
            label = float(row[label_at])
            values = [float(row[i]) for i in features]
        except ValueError:
            bad = next(i for i in [label_at, *features] if not _is_number(row[i]))
            raise DataError(f"{what}: {path} line {line}: not a number in column {bad + 1} "
                            f"({'the label column' if bad == label_at else 'a feature'})") from None
        if label != int(label):
            raise DataError(f"{what}: {path} line {line}: the label is not an integer class")
        x[line - 2], y[line - 2] = values, int(label)
    return Table(x, y)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def table_from_arrays(features: Any, labels: Any = None, *, label_column: str | None = None, what: str) -> Table:
    """From a numpy array (+ labels), or a pandas DataFrame with a label column (duck-typed: no pandas needed)."""
    if hasattr(features, "columns") and hasattr(features, "to_numpy"):  # a DataFrame
        if label_column is None or label_column not in features.columns:
            raise DataError(f"{what}: the table has no label column {label_column!r} "
                            f"(columns: {', '.join(map(str, list(features.columns)[:12]))})")
        labels = features[label_column].to_numpy()
        features = features.drop(columns=[label_column]).to_numpy()
    if labels is None:
        raise DataError(f"{what}: labels are required (a label column or a labels array)")
    try:
        x = np.asarray(features, dtype=np.float32)
        y_raw = np.asarray(labels)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what}: features must be numeric ({exc})") from None
    if x.ndim == 1:
        x = x[:, None]
    if y_raw.ndim != 1 or len(y_raw) != len(x):
        raise DataError(f"{what}: {len(x)} feature rows but labels of shape {y_raw.shape}")
    if y_raw.dtype.kind == "f" and not np.all(np.mod(y_raw, 1) == 0):
        raise DataError(f"{what}: labels must be integer classes")
    if y_raw.dtype.kind not in "iuf" and len(y_raw):
        raise DataError(f"{what}: labels must be integer classes, got {y_raw.dtype}")
    return Table(x, y_raw.astype(np.int64))


def table_from_torch_dataset(dataset: Any, *, what: str) -> Table:
    """From a map-style torch ``Dataset`` of (features, label) pairs."""
    try:
        n = len(dataset)
    except TypeError:
        raise DataError(f"{what}: the torch Dataset has no len(); securefl needs a map-style Dataset") from None
    if n == 0:
        raise DataError(f"{what}: the torch Dataset is empty")
    xs, ys = [], []
    for i in range(n):
        item = dataset[i]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise DataError(f"{what}: item {i} of the torch Dataset is not a (features, label) pair")
        xs.append(torch.as_tensor(item[0], dtype=torch.float32))
        ys.append(int(item[1]))
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1:
        raise DataError(f"{what}: the torch Dataset's items have different shapes {sorted(shapes)[:3]}")
    return Table(torch.stack(xs).numpy(), np.asarray(ys, dtype=np.int64))


def check_table(table: Table, *, what: str, num_classes: int, feature_shape: tuple[int, ...] | None) -> None:
    if len(table) == 0:
        raise DataError(f"{what}: has no records; every table needs at least one")
    if not np.isfinite(table.x).all():
        bad = int(np.argwhere(~np.isfinite(table.x))[0][0])
        raise DataError(f"{what}: record {bad} has a missing, NaN or infinite feature")
    outside = np.flatnonzero((table.y < 0) | (table.y >= num_classes))
    if len(outside):
        # The record, not its label: the label is the owner's data.
        raise DataError(f"{what}: record {int(outside[0])} has a label outside the configured classes "
                        f"0..{num_classes - 1} (data.files.num_classes)")
    if feature_shape is not None and tuple(table.x.shape[1:]) != feature_shape:
        raise DataError(f"{what}: records have {table.x.shape[1:]} features, the others have {feature_shape}")


def transform(x: np.ndarray, kind: str) -> np.ndarray:
    """A per-record transform that needs no statistic of anyone's data."""
    if kind == "signed_log1p":
        return (np.sign(x) * np.log1p(np.abs(x))).astype(np.float32)
    return x


def owner_tables(config: Any, *, local: set[str] | None,
                 given: Mapping[str, Table] | None = None) -> tuple[Dataset, FederatedSplit]:
    """The data set and split of a run whose data the owners bring.

    ``local``: the participants whose tables this process reads (None: all, as in a simulation); the others
    get empty views. ``given``: tables from code (keys: participant ids, plus ``"test"`` and ``"public"``).
    """
    files = config.data.files
    seed = config.run.seed

    def load(key: str, path: str | None, what: str) -> Table | None:
        if given is not None:
            return given.get(key)
        return read_csv_table(path, label_column=files.label_column, what=what) if path else None

    test = load("test", files.test_file, "the test table")
    if test is None:
        raise DataError("no test table: set data.files.test_file (or pass test= to securefl.api.train)")
    public = load("public", files.public_file, "the public table")
    owned: dict[int, Table] = {}
    for i, p in enumerate(config.participants):
        if local is None or p.id in local:
            table = load(p.id, p.data_file, f"participant {p.id!r}")
            if table is None:
                raise DataError(f"participant {p.id!r}: no data table")
            owned[i] = table
    shape = tuple(test.x.shape[1:])
    check_table(test, what="the test table", num_classes=files.num_classes, feature_shape=None)
    if public is not None:
        check_table(public, what="the public table", num_classes=files.num_classes, feature_shape=shape)
    for i, table in owned.items():
        what = f"participant {config.participants[i].id!r}" + (f" ({config.participants[i].data_file})"
                                                             if config.participants[i].data_file else "")
        check_table(table, what=what, num_classes=files.num_classes, feature_shape=shape)

    if files.standardize == "public" and public is None:
        raise DataError("data.files.standardize = 'public' needs data.files.public_file")
    scale = _public_scaler(public, files.transform) if files.standardize == "public" and public is not None else None

    def prepared(t: Table) -> np.ndarray:
        x = transform(t.x, files.transform)
        return ((x - scale[0]) / scale[1]).astype(np.float32) if scale is not None else x

    # One training tensor: the public table first, then each owned table; views are index ranges into it.
    pieces = ([public] if public is not None else []) + [owned[i] for i in sorted(owned)]
    x = np.concatenate([prepared(t) for t in pieces]) if pieces else np.empty((0, *shape), np.float32)
    y = np.concatenate([t.y for t in pieces]) if pieces else np.empty(0, np.int64)
    offset = 0
    public_idx = np.empty(0, dtype=np.int64)
    if public is not None:
        public_idx = np.arange(len(public), dtype=np.int64)
        offset = len(public)
    parties = []
    for i, _ in enumerate(config.participants):
        if i in owned:
            rows = np.arange(offset, offset + len(owned[i]), dtype=np.int64)
            offset += len(owned[i])
            parties.append(train_val_split(rows, config.data.val_fraction, _val_seed(seed, i)))
        else:
            parties.append(PartySplit(train=np.empty(0, dtype=np.int64), val=np.empty(0, dtype=np.int64)))
    public_val = np.empty(0, dtype=np.int64)
    if public is not None and config.data.public_labelled:
        # A labelled public set gets its own validation split, for early stopping of transfer learning.
        public_split = train_val_split(public_idx, 0.1, derive_seed(seed, "public-val"))
        public_idx, public_val = public_split.train, public_split.val
    classes = tuple(range(files.num_classes))
    dataset = Dataset(name=config.data.dataset, x_train=torch.from_numpy(np.ascontiguousarray(x)),
                      y_train=torch.from_numpy(y), x_test=torch.from_numpy(prepared(test)),
                      y_test=torch.from_numpy(test.y), num_classes=files.num_classes)
    split = FederatedSplit(public=public_idx, public_val=public_val, parties=tuple(parties),
                           private_classes=classes, public_classes=classes)
    return dataset, split


def _public_scaler(public: Table, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the public table's (transformed) features: public facts, so no privacy is spent."""
    x = transform(public.x, kind)
    std = x.std(axis=0)
    return x.mean(axis=0), np.where(std > 1e-8, std, 1.0)


def _val_seed(seed: int, index: int) -> int:
    return derive_seed(seed, "val", index)
