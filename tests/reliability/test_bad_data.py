"""Bad data: a silo of one class or smaller than a batch trains; an empty split, labels outside the
configured classes and features of the wrong shape stop the run before any training, with one message
naming the participant (or the file) and the problem, never a traceback from inside torch."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from securefl.cli import main
from securefl.core.party import DataView, Party
from securefl.data.datasets import DataError, load_dataset
from securefl.data.split import build_split
from tests.conftest import tiny_raw
from tests.data.test_datasets import _write_idx
from tests.reliability.helpers import ValidatedFederation, small_config


def _pool(**data: Any) -> tuple[np.ndarray, np.ndarray]:
    """The private pool (train indices outside the public set) of the small config, and the labels."""
    cfg = small_config(data=data) if data else small_config()
    dataset = load_dataset("digits", seed=cfg.run.seed)
    split = build_split(cfg.data, dataset, seed=cfg.run.seed, n_parties=len(cfg.participants))
    pool = np.sort(np.concatenate([np.concatenate([p.train, p.val]) for p in split.parties]))
    return pool, dataset.y_train.numpy()


def _explicit(assignment: list[list[int]]) -> dict[str, Any]:
    return {"kind": "explicit", "assignment": assignment}


def _explicit_raw(assignment: list[list[int]], **data: Any) -> dict[str, Any]:
    raw = tiny_raw(data=data)
    raw["data"]["partition"] = _explicit(assignment)
    return raw


def _cli(tmp_path: Path, raw: dict[str, Any], capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("privacy", ["none", "record"])
def test_a_one_class_silo_and_a_silo_smaller_than_a_batch_both_train(privacy: str, tmp_path: Path) -> None:
    pool, labels = _pool()
    rng = np.random.default_rng(0)
    one_class = pool[labels[pool] == 3][:80]
    rest = rng.permutation(np.setdiff1d(pool, one_class))
    assignment = [rest[:200].tolist(), one_class.tolist(), rest[200:212].tolist()]
    dp = privacy == "record"
    cfg = small_config(dp=dp, rounds=1 if dp else 2, partition=_explicit(assignment),
                       **({"privacy": {"unit": "record"}} if dp else {}))
    fed = ValidatedFederation(cfg, tmp_path / "run", progress=False)
    by_id = {p.id: p for p in fed.parties}
    assert set(by_id["p1"].train.y.tolist()) == {3}
    assert 0 < len(by_id["p2"].train) < cfg.training.batch_size
    summary = fed.run()
    assert summary["rounds"] == cfg.run.rounds
    for p in summary["participants"]:
        assert math.isfinite(p["final_accuracy"])
        if dp:
            assert 0 < p["epsilon"] <= p["target_epsilon"]
    if dp:
        assert main(["audit", str(tmp_path / "run")]) == 0


def test_an_empty_validation_split_trains(tmp_path: Path) -> None:
    fed = ValidatedFederation(small_config(rounds=1, data={"val_fraction": 0.0}), tmp_path / "run", progress=False)
    assert all(len(p.val) == 0 for p in fed.parties)
    assert fed.run()["rounds"] == 1


def test_an_empty_training_split_is_refused_when_the_config_is_read(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    pool, _ = _pool()
    raw = _explicit_raw([pool[:50].tolist(), [], pool[50:100].tolist()])
    code, err = _cli(tmp_path, raw, capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "participant 'p1' has an empty split" in err and "data.partition.assignment.1" in err
    assert not (tmp_path / "run").exists()


def test_a_record_outside_the_configured_classes_is_refused_naming_the_participant(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = {"private_classes": [0, 1, 2, 3, 4], "public_classes": [5, 6, 7, 8, 9]}
    pool, labels = _pool(**data)
    seven = np.flatnonzero(labels == 7)
    raw = _explicit_raw([pool[:40].tolist(), [*pool[40:80].tolist(), int(seven[0])], pool[80:120].tolist()], **data)
    code, err = _cli(tmp_path, raw, capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "participant 1 lists indices outside the private pool" in err and "private_classes" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _corrupted(party_id: str, corrupt: Callable[[Party], None]) -> type[ValidatedFederation]:
    """A federation in which one participant's local data is broken (what its own loader handed over)."""

    class Corrupted(ValidatedFederation):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            import securefl.runtime.federation as federation

            wire = federation.host_participants

            def wire_corrupted(config: Any, *, parties: Any, **rest: Any) -> Any:
                corrupt(next(p for p in parties if p.id == party_id))
                return wire(config, parties=parties, **rest)

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(federation, "host_participants", wire_corrupted)
                super().__init__(*args, **kwargs)

    return Corrupted


def _relabel(value: int) -> Callable[[Party], None]:
    def corrupt(party: Party) -> None:
        y = party.train.y_all.clone()
        y[party.train.idx[0]] = value
        party.train = DataView(party.train.x_all, y, party.train.idx)

    return corrupt


def _reshape(party: Party) -> None:
    x = party.train.x_all[:, :, :7, :7].clone()
    party.train = DataView(x, party.train.y_all, party.train.idx)


def _nan_features(party: Party) -> None:
    x = party.train.x_all.clone()
    x[party.train.idx[:3], 0, 0, 0] = float("nan")
    party.train = DataView(x, party.train.y_all, party.train.idx)


def _float_labels(party: Party) -> None:
    party.train = DataView(party.train.x_all, party.train.y_all.float(), party.train.idx)


@pytest.mark.parametrize(
    ("corrupt", "changes", "message"),
    [
        (_relabel(12), {}, "participant 'p1': training labels [12] are outside the configured classes 0..9"),
        (_relabel(7), {"data": {"private_classes": [0, 1, 2, 3, 4]}},
         "participant 'p1': training labels [7] are outside the configured classes 0..4"),
        (_float_labels, {}, "participant 'p1': training labels have dtype torch.float32; integer class indices are expected"),
        (_reshape, {}, "participant 'p1': training features have shape (1, 7, 7) per record, but the dataset's "
                       "(and every model's) input shape is (1, 8, 8)"),
        (_nan_features, {}, "participant 'p1': 3 training feature values are NaN or Inf"),
    ],
    ids=["label-12", "label-outside-private-classes", "float-labels", "wrong-feature-shape", "nan-features"],
)
def test_a_participant_with_broken_data_is_refused_before_any_training(
        corrupt: Callable[[Party], None], changes: dict[str, Any], message: str, tmp_path: Path) -> None:
    # Refused while the federation is built: before transfer learning, round 1 or any metrics.
    with pytest.raises(DataError) as info:
        _corrupted("p1", corrupt)(small_config(**changes), tmp_path / "run", progress=False)
    assert str(info.value) == message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _fashion_dir(tmp_path: Path, *, test_images: tuple[int, ...] = (5, 28, 28), test_labels: int = 5,
                 train_label: int = 3) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    labels = rng.integers(0, 10, 40)
    labels[7] = train_label
    _write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (40, 28, 28)))
    _write_idx(root / "train-labels-idx1-ubyte.gz", labels)
    _write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, test_images))
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, test_labels))
    return root


@pytest.mark.parametrize(
    ("layout", "needle"),
    [
        ({"train_label": 12}, "train-labels-idx1-ubyte.gz: label 12 at index 7 is outside the 10 Fashion-MNIST classes"),
        ({"test_images": (5, 27, 27)}, "t10k-images-idx3-ubyte.gz: expected N x 28 x 28 Fashion-MNIST images, "
                                       "found shape (5, 27, 27)"),
        ({"test_images": (6, 28, 28)}, "t10k-labels-idx1-ubyte.gz: expected 6 labels (one per image of "
                                       "t10k-images-idx3-ubyte.gz), found shape (5,)"),
    ],
    ids=["label-12-in-file", "27x27-test-images", "label-count"],
)
def test_bad_dataset_files_are_named_in_one_line(layout: dict[str, Any], needle: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = _fashion_dir(tmp_path, **layout)
    code, err = _cli(tmp_path, tiny_raw(data={"dataset": "fashion_mnist", "public_size": 0}), capsys,
                     "--data-dir", str(root))
    assert code == 2 and len(err.splitlines()) == 1
    assert needle in err, err
