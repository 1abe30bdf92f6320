"""Under record-level DP nothing is chosen by the score of private validation records.

Stopping early, or keeping the best-scoring weights, on held-out private records is a data-dependent
release that no ledger entry covers (those records are not in DP-SGD's sample at all). A DP participant
therefore trains the epochs its noise was calibrated for and keeps its latest weights; without DP the
validation split still selects.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import securefl.protocols.fedmd as fedmd
import securefl.protocols.local_only as local_only
from securefl.runtime.federation import Federation
from tests.conftest import tiny_config


@pytest.mark.parametrize("module", [local_only, fedmd], ids=["local_only", "fedmd"])
def test_a_dp_participant_never_reads_its_validation_split_but_a_plain_one_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module) -> None:  # type: ignore[no-untyped-def]
    reads: list[str] = []
    real = module.val_score

    def counting(party, classes):  # type: ignore[no-untyped-def]
        reads.append(party.id)
        return real(party, classes)

    monkeypatch.setattr(module, "val_score", counting)
    name = module.__name__.rsplit(".", 1)[1]
    private = tiny_config(protocol=name, privacy={"unit": "record", "target_epsilon": 8.0, "delta": 1e-5})
    summary = Federation(private, tmp_path / "dp", progress=False).run()
    assert reads == []
    # The planned epochs all ran, so each participant spent its whole calibrated budget (to the accountant's
    # rounding), not less as it might after stopping early.
    for p in summary["participants"]:
        assert p["epsilon"] == pytest.approx(p["target_epsilon"], rel=0.02)

    Federation(tiny_config(protocol=name), tmp_path / "plain", progress=False).run()
    assert reads, "without DP the validation split should still select epochs and weights"
