"""Issue 19 (findings 8 and 9): a δ of 1/n or more is refused before round 1, naming the field and the value.

As the coordinator: it writes the experiment's δ (or a participant's), and a δ ≥ 1/n lets a mechanism publish
one unit's data outright with probability δ while the ledger still reports a small ε. Today δ = 0.5 is accepted.
The data owner's own policy gets the same check. n is the participant's record count at record level and the
number of participants at participant level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from securefl.runtime.federation import Federation
from tests.conftest import tiny_config

PARTICIPANT = {"unit": "participant", "target_epsilon": 8.0}


def refusal(cfg: Any, out: Path) -> str:
    """The reason the run is refused before round 1; the test fails if it is set up."""
    try:
        Federation(cfg, out, progress=False)
    except Exception as exc:  # noqa: BLE001 - whichever error refuses it, its message must name the field
        return str(exc)
    pytest.fail("the run was set up: its ledgers opened and its noise was calibrated for this δ")


def test_an_experiment_delta_of_one_half_is_refused_naming_privacy_delta(tmp_path: Path) -> None:
    reason = refusal(tiny_config(privacy={**PARTICIPANT, "delta": 0.5}), tmp_path / "run")
    assert "privacy.delta = 0.5" in reason and "1/n" in reason and "3 participants" in reason


def test_a_participants_own_delta_is_refused_naming_its_field(tmp_path: Path) -> None:
    participants = [{"id": "p0", "model": "cnn_s"}, {"id": "p1", "model": "mlp_s", "delta": 0.4},
                    {"id": "p2", "model": "deepcnn_s"}]
    reason = refusal(tiny_config(privacy=PARTICIPANT, participants=participants), tmp_path / "run")
    assert "participants.1.delta = 0.4" in reason and "'p1'" in reason


def test_record_level_delta_is_checked_against_the_participants_record_count(tmp_path: Path) -> None:
    # Every tiny participant holds more than 10 records, so 0.1 >= 1/n for each.
    reason = refusal(tiny_config(privacy={"unit": "record", "target_epsilon": 8.0, "delta": 0.1}), tmp_path / "run")
    assert "privacy.delta = 0.1" in reason and "training records" in reason


def test_a_policy_file_with_a_delta_of_one_half_is_refused_naming_the_file(tmp_path: Path) -> None:
    policy = tmp_path / "p0.yaml"
    policy.write_text("max_epsilon: 8.0\ndelta: 0.5\nunit: participant\n")
    participants = [{"id": "p0", "model": "cnn_s", "policy_file": str(policy)}, {"id": "p1", "model": "mlp_s"},
                    {"id": "p2", "model": "deepcnn_s"}]
    reason = refusal(tiny_config(privacy=PARTICIPANT, participants=participants), tmp_path / "run")
    assert str(policy) in reason and "'delta'" in reason and "0.5" in reason


def test_a_small_delta_still_runs(tmp_path: Path) -> None:
    fed = Federation(tiny_config(privacy={**PARTICIPANT, "delta": 1e-5}), tmp_path / "run", progress=False)
    assert fed.privacy is not None and fed.privacy.participants["p0"].delta == 1e-5
