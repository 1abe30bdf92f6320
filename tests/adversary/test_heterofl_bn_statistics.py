"""Finding 5 of issue 19, played by the coordinator: HeteroFL's static batch norm under DP.

With ``heterofl.norm: bn`` the server's sBN query asks every client for the per-channel sums (sum x, sum x^2, n)
of a norm layer's input over its raw training data. Those answers never pass the participants' layers, so no DP
layer clips, noises or books them, whatever ``privacy.unit`` says: the coordinator reads exact statistics of the
private data (and, from n, the record count). The set-up must be refused before round 1 under any DP unit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from securefl.core.aggregator import PlainAggregator
from tests.adversary.wiretap import Wiretap, run_or_refusal
from tests.conftest import tiny_config

HETEROFL = {"hidden_sizes": [8, 16], "local_epochs": 1, "batch_size": 32, "proportions": "a1-b1-c1", "norm": "bn"}
PRIVACY = {"record": {"unit": "record", "target_epsilon": 8.0},
           "participant": {"unit": "participant", "target_epsilon": 8.0, "clip_norm": 5.0}}


class Eavesdropper(PlainAggregator):
    """The coordinator's aggregator, keeping what it is asked to sum."""

    def __init__(self) -> None:
        self.summed: list[Any] = []

    def sum(self, replies, field):  # type: ignore[no-untyped-def]
        self.summed.extend((field, r) for r in replies)
        return super().sum(replies, field)


@pytest.mark.parametrize("unit", list(PRIVACY))
def test_the_coordinator_reads_no_raw_batch_norm_sums_under_dp(tmp_path: Path, unit: str) -> None:
    config = tiny_config(protocol="heterofl", run={"rounds": 1}, privacy=PRIVACY[unit], heterofl=HETEROFL)
    spy = Eavesdropper()

    def plant(fed):  # type: ignore[no-untyped-def]
        fed.aggregator = spy

    fed, refusal = run_or_refusal(config, tmp_path / "run", Wiretap(), before_run=plant)
    raw = [(r.sender, int(r.tensor("sbn_sums")[-1])) for field, r in spy.summed if field == "sbn_sums"]
    assert not raw, (f"privacy.unit={unit}: the coordinator summed {len(raw)} raw sBN answers in the clear, e.g. "
                     f"{raw[0][0]}'s with n = {raw[0][1]} activations per channel")
    assert fed is None and refusal is not None and "heterofl.norm" in refusal
