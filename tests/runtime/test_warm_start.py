"""training.warm_start: every protocol may start round 1 from the early-stopped local fit local-only gets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from securefl.config import parse_config
from securefl.protocols import ProtocolSetupError
from securefl.runtime.federation import Federation


def _raw(protocol: str, *, warm_start: bool, **extra: Any) -> dict[str, Any]:
    return {"protocol": protocol, "run": {"seed": 3, "rounds": 1},
            "data": {"dataset": "digits", "public_size": 300},
            "training": {"warm_start": warm_start, "warm_start_max_epochs": 4, "warm_start_patience": 2},
            "local_only": {"max_epochs_first": 4, "patience": 2},
            "participants": [{"id": f"p{i}", "model": m} for i, m in enumerate(["mlp_s", "cnn_s", "mlp_m"])],
            **extra}


def _round0(run: Path) -> dict[str, float]:
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["round"] == 0
    return {pid: m["accuracy"] for pid, m in first["participants"].items()}


def test_warm_start_is_the_local_only_first_fit(tmp_path: Path) -> None:
    """With the same cap and patience, a warm-started FedH2L enters round 1 with exactly local-only's models."""
    Federation(parse_config(_raw("local_only", warm_start=False), "t"), tmp_path / "lo", progress=False).run()
    Federation(parse_config(_raw("fedh2l", warm_start=True), "t"), tmp_path / "h2l", progress=False).run()
    Federation(parse_config(_raw("fedh2l", warm_start=False), "t"), tmp_path / "cold", progress=False).run()
    local, warm, cold = _round0(tmp_path / "lo"), _round0(tmp_path / "h2l"), _round0(tmp_path / "cold")
    assert warm == local
    assert all(warm[p] > cold[p] + 0.05 for p in warm), (warm, cold)  # an untrained model scores near chance


def test_warm_start_is_stated_in_the_summary(tmp_path: Path) -> None:
    summary = Federation(parse_config(_raw("fedh2l", warm_start=True), "t"), tmp_path / "r", progress=False).run()
    assert "at most 4 epochs, patience 2" in summary["notes"]["warm start"]
    cold = Federation(parse_config(_raw("fedh2l", warm_start=False), "t"), tmp_path / "c", progress=False).run()
    assert "warm start" not in cold["notes"]


def test_warm_start_refused_where_it_cannot_apply(tmp_path: Path) -> None:
    with pytest.raises(ProtocolSetupError, match="training.warm_start = true: the pooled baseline"):
        Federation(parse_config(_raw("pooled", warm_start=True), "t"), tmp_path / "r", progress=False)


def test_warm_start_is_in_the_dp_plan(tmp_path: Path) -> None:
    """Under record-level DP the warm start's epochs are planned into σ (the ledger would refuse them otherwise)."""
    def planned_steps(warm: bool, out: Path) -> int:
        raw = _raw("fedh2l", warm_start=warm, privacy={"unit": "record", "target_epsilon": 8.0, "delta": 1e-3})
        fed = Federation(parse_config(raw, "t"), out, progress=False)
        fed.run()
        plan = json.loads((out / "privacy_plan.json").read_text())
        return sum(int(p["planned_steps"]) for p in plan["participants"].values())

    assert planned_steps(True, tmp_path / "warm") > planned_steps(False, tmp_path / "cold")
