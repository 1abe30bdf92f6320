"""securefl as a library: call it from a site's own pipeline, with the site's own data objects.

    from securefl import api

    sites = [
        api.Participant.from_table("hospital_a", frame_a, label_column="diagnosis", model="mlp_l",
                                   target_epsilon=4.0),
        api.Participant.from_dataset("hospital_b", torch_dataset_b, model="mlp_m", target_epsilon=2.0,
                                     policy_file="/etc/securefl/hospital_b.yaml"),
    ]
    result = api.train(sites, test=(x_test, y_test), public=x_public, protocol="fedmd", rounds=8,
                       privacy_unit="record", secure_aggregation="ckks", out="runs/site-pipeline")
    model = result.models["hospital_a"]        # a torch.nn.Module, trained
    result.ledgers["hospital_a"]               # Path of its privacy ledger
    assert result.audit().ok                   # chains, seals and ε, recomputed independently

Everything goes through the same validated config and runtime as ``securefl run``: a bad value raises
:class:`securefl.config.ConfigError` naming the field, bad data raises
:class:`securefl.data.datasets.DataError` naming the participant. Privacy parameters are keyword-only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from securefl.config import ConfigError, parse_config
from securefl.data.datasets import DataError
from securefl.data.tables import Table, table_from_arrays, table_from_torch_dataset

__all__ = ["Participant", "Result", "train", "ConfigError", "DataError"]


@dataclass(frozen=True)
class Participant:
    """One data owner: its records, its model and its own privacy terms."""

    id: str
    model: str
    data: Table
    target_epsilon: float | None = None
    delta: float | None = None
    policy_file: str | None = None
    lr: float | None = None  # the owner's own learning rate, in place of the protocol's (see config.ParticipantConfig)

    @classmethod
    def from_table(cls, id: str, features: Any, labels: Any = None, *, model: str, label_column: str | None = None,
                   target_epsilon: float | None = None, delta: float | None = None,
                   policy_file: str | Path | None = None, lr: float | None = None) -> Participant:
        """From a pandas DataFrame with ``label_column``, or a numpy feature array plus ``labels``."""
        table = table_from_arrays(features, labels, label_column=label_column, what=f"participant {id!r}")
        return cls(id, model, table, target_epsilon, delta, str(policy_file) if policy_file else None, lr)

    @classmethod
    def from_dataset(cls, id: str, dataset: Any, *, model: str, target_epsilon: float | None = None,
                     delta: float | None = None, policy_file: str | Path | None = None,
                     lr: float | None = None) -> Participant:
        """From a map-style torch ``Dataset`` of (features, label) pairs."""
        table = table_from_torch_dataset(dataset, what=f"participant {id!r}")
        return cls(id, model, table, target_epsilon, delta, str(policy_file) if policy_file else None, lr)


@dataclass
class Result:
    summary: dict[str, Any]
    models: dict[str, torch.nn.Module]
    ledgers: dict[str, Path] = field(default_factory=dict)
    run_dir: Path = Path()

    def audit(self) -> Any:
        """Verify every ledger of the run (see ``securefl audit``)."""
        from securefl.privacy.audit import audit_run

        return audit_run(self.run_dir)


def train(participants: Sequence[Participant], *, test: Any, out: str | Path, public: Any = None,
          protocol: str = "fedmd", rounds: int = 10, seed: int = 0, num_classes: int | None = None,
          label_column: str | None = None, public_labelled: bool = False,
          privacy_unit: str = "none", delta: float = 1e-5, target_epsilon: float | None = None,
          accountant: str = "rdp", secure_aggregation: str = "none",
          training: Mapping[str, Any] | None = None, protocol_options: Mapping[str, Any] | None = None,
          resume: bool = False, progress: bool = False) -> Result:
    """Run ``protocol`` over ``participants`` in this process; the run directory ``out`` gets what
    ``securefl run`` writes (metrics, checkpoints, report, one ledger per participant under DP).

    ``test`` and ``public`` are a (features, labels) pair, a DataFrame with ``label_column``, or a torch
    Dataset; ``public`` may also be features alone (its labels are then never available). ``num_classes``
    defaults to one more than the largest label anywhere.
    """
    if not participants:
        raise ConfigError("participants: at least one participant is required")
    tables: dict[str, Table] = {p.id: p.data for p in participants}
    tables["test"] = _table(test, label_column, "the test table")
    if public is not None:
        tables["public"] = _table(public, label_column, "the public table")
    if num_classes is None:
        num_classes = int(max(int(t.y.max()) for t in tables.values() if len(t)) + 1)
    raw: dict[str, Any] = {
        "protocol": protocol,
        "run": {"seed": seed, "rounds": rounds},
        "data": {"dataset": "tables", "public_labelled": public_labelled,
                 "files": {"num_classes": num_classes, "label_column": label_column or "label"}},
        "privacy": {"unit": privacy_unit, "delta": delta, "accountant": accountant,
                    **({"target_epsilon": target_epsilon} if target_epsilon is not None else {})},
        "secure_aggregation": secure_aggregation,
        "participants": [{"id": p.id, "model": p.model, "target_epsilon": p.target_epsilon, "delta": p.delta,
                          "policy_file": p.policy_file, "lr": p.lr} for p in participants],
    }
    if training:
        raw["training"] = dict(training)
    if protocol_options:
        raw[protocol] = dict(protocol_options)
    config = parse_config(raw, "securefl.api.train")

    from securefl.runtime.checkpoint import CHECKPOINT
    from securefl.runtime.federation import Federation
    from securefl.runtime.privacy import ledger_path

    out = Path(out)
    fed = Federation(config, out, resume=resume and (out / CHECKPOINT).exists(), progress=progress, tables=tables)
    summary = fed.run()
    models = {p.id: p.model for p in fed.parties if p.model is not None}
    ledgers = {p.id: ledger_path(out, p.id) for p in fed.parties if ledger_path(out, p.id).exists()}
    return Result(summary=summary, models=models, ledgers=ledgers, run_dir=out)


def _table(value: Any, label_column: str | None, what: str) -> Table:
    if isinstance(value, Table):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        return table_from_arrays(value[0], value[1], what=what)
    if hasattr(value, "columns"):
        if label_column is None or label_column not in value.columns:
            # A public DataFrame without labels: features only.
            return table_from_arrays(value, np.zeros(len(value), dtype=np.int64), what=what)
        return table_from_arrays(value, label_column=label_column, what=what)
    if isinstance(value, torch.utils.data.Dataset):
        return table_from_torch_dataset(value, what=what)
    # Features alone (a public set without labels): labels are placeholders no protocol may read.
    x = np.asarray(value, dtype=np.float32)
    return table_from_arrays(x, np.zeros(len(x), dtype=np.int64), what=what)
