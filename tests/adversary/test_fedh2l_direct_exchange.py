"""Finding 3 of issue 19, played by the relay and by a peer: FedH2L's ``exchange: direct`` under secure aggregation.

Every peer-to-peer message crosses the relay. Under ``secure_aggregation: masking | ckks`` the owners expect the
relay to see only a sealed sum, yet direct posteriors are never sealed; and under distributed DP noise each peer
message carries only a 1/sqrt(n) share of the noise the ledger booked, so the peer that reads it sees far more than
the booked ε. Both set-ups must be refused before round 1, pointing to ``fedh2l.exchange: relay_sum``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.adversary.wiretap import Wiretap, run_or_refusal
from tests.conftest import tiny_config

FEDH2L = {"fedh2l": {"seed_size": 60, "seed_batch_size": 16}, "run": {"rounds": 1}}


def _peer_posteriors(tap: Wiretap) -> list:
    return [m for m in tap.seen if m.kind == "posteriors" and m.receiver != "aggregator"
            and isinstance(m.payload.get("posteriors"), torch.Tensor)]


@pytest.mark.parametrize("scheme", ["masking", "ckks"])
def test_the_relay_reads_no_plaintext_posteriors_under_secure_aggregation(tmp_path: Path, scheme: str) -> None:
    tap = Wiretap()
    fed, refusal = run_or_refusal(tiny_config(protocol="fedh2l", secure_aggregation=scheme, **FEDH2L),
                                  tmp_path / "run", tap)
    # The attack: the relay reads a peer's posteriors in the clear (rows are probability vectors).
    read = [m for m in _peer_posteriors(tap) if torch.allclose(m.tensor("posteriors").sum(dim=1), torch.ones(60))]
    assert not read, (f"under secure_aggregation={scheme} the relay read {len(read)} plaintext posterior messages, "
                      f"e.g. {read[0].sender} -> {read[0].receiver}")
    assert fed is None and refusal is not None
    assert "fedh2l.exchange" in refusal and "relay_sum" in refusal
    assert not (tmp_path / "run").exists()  # refused before round 1: nothing left behind


def test_a_peer_message_never_carries_only_a_share_of_distributed_noise(tmp_path: Path) -> None:
    # clip_norm 10 >= the norm of any 60 x 10 posterior matrix, so nothing is clipped: what a message carries
    # beyond the clean posteriors is exactly its noise.
    config = tiny_config(protocol="fedh2l", secure_aggregation="masking", **FEDH2L,
                         privacy={"unit": "participant", "target_epsilon": 2.0, "noise": "distributed",
                                  "clip_norm": 10.0, "min_contributors": 1.0})
    tap = Wiretap()
    fed, refusal = run_or_refusal(config, tmp_path / "run", tap)
    if fed is not None:
        # The attack: p1 reads p0's message; the test (which knows p0's clean posteriors) measures its noise.
        p0 = next(p for p in fed.parties if p.id == "p0")
        msg = next(m for m in _peer_posteriors(tap) if m.sender == "p0")
        noise_std = float((msg.tensor("posteriors") - p0.state["sent_posteriors"]["posteriors"]).std())
        booked = next(e for e in fed.privacy.participants["p0"].ledger.entries if e.get("kind") == "release")
        booked_std = booked["noise_multiplier"] * booked["sensitivity"]
        assert noise_std >= 0.8 * booked_std, (
            f"p1 read p0's posteriors with noise of std {noise_std:.3f}, while p0's ledger booked {booked_std:.3f} "
            f"(the ε p0 spent against p1 is well above the booked one)")
    assert refusal is not None and "fedh2l.exchange" in refusal and "relay_sum" in refusal


def test_relay_sum_still_runs_under_distributed_noise(tmp_path: Path) -> None:
    """The form the refusal points to runs: the relay only ever sees the masked sum."""
    config = tiny_config(protocol="fedh2l", secure_aggregation="masking",
                         **{**FEDH2L, "fedh2l": {**FEDH2L["fedh2l"], "exchange": "relay_sum"}},
                         privacy={"unit": "participant", "target_epsilon": 8.0, "noise": "distributed"})
    tap = Wiretap()
    fed, refusal = run_or_refusal(config, tmp_path / "run", tap)
    assert refusal is None and fed is not None
    assert not _peer_posteriors(tap)
