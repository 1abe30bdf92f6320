"""Shared fixtures: tiny, fast digits experiments."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from securefl.config import deep_merge, parse_config

# The test models are tiny: one intra-op thread is as fast as two on a quiet machine, and much
# faster when other processes share the cores (thread oversubscription made some files 40x slower).
torch.set_num_threads(1)

TINY: dict[str, Any] = {
    "protocol": "fedmd",
    "run": {"seed": 3, "rounds": 2},
    "data": {"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5}, "public_size": 150,
             "val_fraction": 0.15},
    "training": {"batch_size": 32, "local_epochs": 1},
    "participants": [
        {"id": "p0", "model": "cnn_s"},
        {"id": "p1", "model": "mlp_s"},
        {"id": "p2", "model": "deepcnn_s"},
    ],
    "fedmd": {"alignment_size": 100, "transfer_max_epochs": 3, "revisit_epochs": 1},
    "local_only": {"max_epochs_first": 3},
}


def tiny_raw(**changes: Any) -> dict[str, Any]:
    return deep_merge(TINY, changes)


def tiny_config(**changes: Any) -> Any:
    return parse_config(tiny_raw(**changes))


class Crash(Exception):
    """Stands in for a process killed right after a round's checkpoint."""


def crash_after_round(n: int) -> Any:
    """An ``on_round_end`` callback that raises :class:`Crash` once round ``n`` is checkpointed."""

    def crash(rnd: int) -> None:
        if rnd == n:
            raise Crash

    return crash


def metrics_without_time(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("elapsed_s")
    return rows


@pytest.fixture
def make_config():
    return tiny_config


@pytest.fixture(scope="session", autouse=True)
def key_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Simulations keep their owners' keys outside the run directory (one directory per run id): in tests, a
    temporary key store, never the home directory. Session-wide, so module-scoped runs use it too; subprocesses
    inherit it through the environment."""
    root = tmp_path_factory.mktemp("keys")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SECUREFL_KEYS", str(root))
        yield root
