"""Faults injected on a seeded schedule: each run completes without the faulty contribution (rejected and
logged with sender, receiver and reason) or stops cleanly; no ledger under-counts; the audit passes; a
killed run resumes to the same state as one that was never killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from securefl.cli import main
from securefl.core.message import AGGREGATOR
from securefl.crypto.errors import SecAggAbort
from tests.conftest import metrics_without_time
from tests.layers.faults import ChaosTransport, Fault, Killed, random_schedule
from tests.reliability.helpers import (
    IDS,
    assert_ledgers_cover_releases,
    audit_statuses,
    ledger_releases,
    run_with_faults,
    small_config,
)


def _only_rejection(outcome: Any, *, sender: str = "p1", receiver: str = AGGREGATOR) -> str:
    assert len(outcome.rejected) == 1, outcome.rejected
    rejection = outcome.rejected[0]
    assert (rejection["sender"], rejection["receiver"]) == (sender, receiver), rejection
    return rejection["reason"]


def _without_rejected(run: Path) -> list[dict[str, Any]]:
    rows = metrics_without_time(run)
    for row in rows:
        row.pop("rejected")
    return rows


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Fault-free runs to compare against (plain without signing, and masking)."""
    base = tmp_path_factory.mktemp("references")
    runs = {"plain": small_config(signing=False), "masking": small_config(secure="masking"),
            "plain3": small_config(rounds=3)}
    for name, cfg in runs.items():
        outcome = run_with_faults(cfg, base / name, ChaosTransport([]))
        assert outcome.summary is not None and not outcome.rejected
    return {name: base / name for name in runs}


# ----- dropouts ---------------------------------------------------------------------------------------
def test_dropping_out_before_sending_is_recovered_and_nothing_is_booked_for_it(tmp_path: Path) -> None:
    transport = ChaosTransport([Fault("drop_before_send", 2, "p1")])
    outcome = run_with_faults(small_config(secure="masking", dp=True), tmp_path / "run", transport)
    assert outcome.summary is not None and transport.injected == {"drop_before_send": 1}
    assert outcome.senders == {1: list(IDS), 2: ["p0", "p2"]}
    assert "p1" not in outcome.updated[2]  # offline: no consensus, no digest
    # A dropout sends nothing to reject, so the round record names it as missing.
    records = [json.loads(line) for line in (outcome.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["missing"] for r in records] == [[], [], ["p1"]]
    # Nothing left p1 in round 2, so nothing is booked; the others' releases are.
    assert [e["round"] for e in ledger_releases(outcome.out, "p1") if e["payload"] == "logits"] == [1]
    assert_ledgers_cover_releases(outcome.out, transport)
    assert main(["audit", str(outcome.out)]) == 0


def test_dropping_out_after_sending_still_counts_in_the_sum_and_the_ledger(tmp_path: Path) -> None:
    transport = ChaosTransport([Fault("drop_after_send", 1, "p1")])
    outcome = run_with_faults(small_config(secure="masking", dp=True), tmp_path / "run", transport)
    assert outcome.summary is not None
    # Its masked input arrived and was unmasked without its answer (2 of 3 survivors answer, t = 2).
    assert outcome.senders[1] == list(IDS)
    assert sorted(outcome.updated[1]) == ["p0", "p2"] and sorted(outcome.updated[2]) == list(IDS)
    assert ("p1", 1) in transport.released
    assert_ledgers_cover_releases(outcome.out, transport)
    assert main(["audit", str(outcome.out)]) == 0


def test_too_many_dropouts_stop_masking_cleanly_and_the_resumed_run_keeps_the_spend(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = small_config(secure="masking", dp=True)
    transport = ChaosTransport([Fault("drop_before_send", 2, "p1"), Fault("drop_before_send", 2, "p2")])
    outcome = run_with_faults(cfg, out, transport, catch=(SecAggAbort,))
    assert isinstance(outcome.error, SecAggAbort) and "below the threshold" in str(outcome.error)
    assert [row["round"] for row in outcome.rows] == [0, 1]  # nothing of the aborted round is recorded
    assert not (out / "summary.json").exists()
    # p0's round-2 logits left it before the abort: booked, and the audit sees an unfinished run, not a wrong one.
    assert ("p0", 2) in transport.released
    assert_ledgers_cover_releases(out, transport)
    assert audit_statuses(out) == {"unsealed"}

    resumed = run_with_faults(cfg, out, ChaosTransport([]), resume=True)
    assert resumed.summary is not None
    assert_ledgers_cover_releases(out, resumed.transport)
    # The aborted round's release still counts: p0 has two round-2 entries, so its calibrated budget runs
    # out one release early and it stops instead of overspending.
    assert [e["round"] for e in ledger_releases(out, "p0") if e["payload"] == "logits"] == [1, 2]
    p0 = next(p for p in resumed.summary["participants"] if p["id"] == "p0")
    assert p0["stopped_early"] and "budget" in p0["stopped_reason"].lower()
    assert all(p["epsilon"] <= p["target_epsilon"] + 1e-9 for p in resumed.summary["participants"])
    assert main(["audit", str(out)]) == 0


# ----- delayed, duplicated, reordered -----------------------------------------------------------------
@pytest.mark.parametrize(("signing", "reason"), [(True, "stale"), (False, "stale: round 1 received during round 2")])
def test_a_delayed_uplink_is_left_out_of_its_round_and_rejected_as_stale(signing: bool, reason: str,
                                                                          tmp_path: Path) -> None:
    transport = ChaosTransport([Fault("delay", 1, "p1")])
    outcome = run_with_faults(small_config(dp=True, signing=signing), tmp_path / "run", transport)
    assert outcome.summary is not None and outcome.senders == {1: ["p0", "p2"], 2: list(IDS)}
    assert reason in _only_rejection(outcome)
    assert_ledgers_cover_releases(outcome.out, transport)
    assert main(["audit", str(outcome.out)]) == 0


def test_a_delayed_downlink_is_rejected_by_its_receiver(tmp_path: Path) -> None:
    transport = ChaosTransport([Fault("delay", 1, "p2", downlink=True)])
    outcome = run_with_faults(small_config(signing=False), tmp_path / "run", transport)
    assert outcome.summary is not None
    assert "stale" in _only_rejection(outcome, sender=AGGREGATOR, receiver="p2")
    assert sorted(outcome.updated[1]) == ["p0", "p1"] and sorted(outcome.updated[2]) == list(IDS)


def test_a_duplicated_uplink_counts_once(references: dict[str, Path], tmp_path: Path) -> None:
    # Without signing (so no replay check): the validation layer still refuses the second copy, and the
    # run is exactly the fault-free one apart from the logged rejection.
    transport = ChaosTransport([Fault("duplicate", 1, "p1")])
    outcome = run_with_faults(small_config(signing=False), tmp_path / "run", transport)
    assert "duplicate" in _only_rejection(outcome)
    got, want = _without_rejected(outcome.out), _without_rejected(references["plain"])
    # The second copy did cross the wire (one more 60 x 10 float32 payload), and changed nothing else.
    assert got[1]["communication_bytes"]["logits"] == want[1]["communication_bytes"]["logits"] + 60 * 10 * 4
    for row in (*got, *want):
        row.pop("communication_bytes")
    assert got == want


def test_a_duplicated_sealed_uplink_counts_once_under_ckks(tmp_path: Path) -> None:
    transport = ChaosTransport([Fault("duplicate", 1, "p1")])
    outcome = run_with_faults(small_config(secure="ckks", signing=False), tmp_path / "run", transport)
    assert outcome.summary is not None and outcome.senders[1] == list(IDS)
    assert "duplicate" in _only_rejection(outcome)


def test_reordered_uplinks_change_nothing_under_masking(references: dict[str, Path], tmp_path: Path) -> None:
    transport = ChaosTransport([Fault("reorder", 1), Fault("reorder", 2)], seed=1)
    outcome = run_with_faults(small_config(secure="masking"), tmp_path / "run", transport)
    assert transport.injected == {"reorder": 2} and not outcome.rejected
    # The ring sum is exact, so the order of arrival cannot change one bit of the run.
    assert metrics_without_time(outcome.out) == metrics_without_time(references["masking"])


# ----- truncated and flipped bytes -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("secure", "signing", "fault", "reason"),
    [
        ("ckks", False, Fault("truncate", 1, "p1"), "chunk 0 of 1: digest mismatch"),
        ("ckks", False, Fault("flip_bytes", 1, "p1"), "chunk 0 of 1: digest mismatch"),
        # A participant that signs its own broken ciphertext: the signature verifies, the CKKS layer does not.
        ("ckks", True, Fault("truncate", 1, "p1", resign=True), "digest mismatch"),
        ("ckks", True, Fault("flip_bytes", 1, "p1"), "bad signature"),
        ("masking", False, Fault("truncate", 1, "p1"), "expected one chunk of 4800 bytes, got chunks of [2400]"),
        ("masking", True, Fault("flip_bytes", 1, "p1"), "bad signature"),
        ("none", False, Fault("truncate", 1, "p1"), "shape (60, 9), expected (60, 10)"),
        ("none", True, Fault("truncate", 1, "p1", downlink=True), "bad signature"),
    ],
    ids=lambda v: v.label() if isinstance(v, Fault) else str(v),
)
def test_truncated_or_flipped_bytes_are_rejected_and_the_round_goes_on(secure: str, signing: bool, fault: Fault,
                                                                        reason: str, tmp_path: Path) -> None:
    transport = ChaosTransport([fault])
    outcome = run_with_faults(small_config(secure=secure, signing=signing), tmp_path / "run", transport)
    assert outcome.summary is not None and transport.total_injected == 1
    if fault.downlink:
        assert reason in _only_rejection(outcome, sender=AGGREGATOR, receiver="p1")
        assert "p1" not in outcome.updated[1]
    else:
        assert reason in _only_rejection(outcome)
        assert outcome.senders == {1: ["p0", "p2"], 2: list(IDS)}


# ----- NaN, Inf, wrong shapes and dtypes from a participant ------------------------------------------
@pytest.mark.parametrize(
    ("secure", "kind", "problem"),
    [
        ("none", "nan", "1 of 600 values are NaN or Inf"),
        ("ckks", "nan", "1 of 600 values are NaN or Inf"),
        ("masking", "inf", "1 of 600 values are NaN or Inf"),
        ("ckks", "wrong_shape", "shape (60, 9), expected (60, 10)"),
        ("masking", "wrong_dtype", "dtype torch.int64"),
    ],
)
def test_a_broken_model_output_is_withheld_by_its_owner_and_nothing_is_booked(secure: str, kind: str, problem: str,
                                                                                tmp_path: Path) -> None:
    # The participant's own software refuses to release it (under CKKS it could not even encrypt a NaN):
    # an empty "withheld" notice goes instead, the server logs it, and the round goes on without p1.
    transport = ChaosTransport([Fault(kind, 1, "p1", at="model")])
    outcome = run_with_faults(small_config(secure=secure, dp=True), tmp_path / "run", transport)
    assert outcome.summary is not None and outcome.senders == {1: ["p0", "p2"], 2: list(IDS)}
    reason = _only_rejection(outcome)
    assert reason.startswith("withheld by the sender: p1's own check") and problem in reason
    assert [e["round"] for e in ledger_releases(outcome.out, "p1") if e["payload"] == "logits"] == [2]
    assert ("p1", 1) not in transport.released
    assert_ledgers_cover_releases(outcome.out, transport)
    assert main(["audit", str(outcome.out)]) == 0


@pytest.mark.parametrize(
    ("kind", "signing", "problem"),
    [
        ("nan", True, "1 of 600 values are NaN or Inf"),
        ("inf", False, "1 of 600 values are NaN or Inf"),
        ("wrong_shape", True, "shape (60, 9), expected (60, 10)"),
        ("wrong_dtype", True, "dtype torch.int64; a floating-point tensor is expected"),
    ],
)
def test_a_participant_that_signs_broken_values_is_rejected_by_the_server(kind: str, signing: bool, problem: str,
                                                                          tmp_path: Path) -> None:
    transport = ChaosTransport([Fault(kind, 1, "p1", resign=True)])
    outcome = run_with_faults(small_config(dp=True, signing=signing), tmp_path / "run", transport)
    assert outcome.summary is not None and outcome.senders == {1: ["p0", "p2"], 2: list(IDS)}
    assert _only_rejection(outcome) == f"field 'logits': {problem}"
    assert_ledgers_cover_releases(outcome.out, transport)  # it left p1 (booked), then was broken on the way
    assert main(["audit", str(outcome.out)]) == 0


# ----- killed mid-round --------------------------------------------------------------------------------
def test_a_run_killed_mid_round_resumes_to_the_uninterrupted_state(references: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    out, cfg = tmp_path / "run", small_config(rounds=3)
    transport = ChaosTransport([Fault("kill", 2, count=2)])
    killed = run_with_faults(cfg, out, transport, catch=(Killed,))
    assert isinstance(killed.error, Killed) and transport.injected == {"kill": 1}
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["round"] == 1
    assert not (out / "summary.json").exists()
    resumed = run_with_faults(cfg, out, ChaosTransport([]), resume=True)
    assert resumed.summary is not None
    assert metrics_without_time(out) == metrics_without_time(references["plain3"])


def test_a_private_run_killed_mid_round_never_under_counts_and_stays_within_budget(tmp_path: Path) -> None:
    out, cfg = tmp_path / "run", small_config(secure="masking", dp=True, rounds=3)
    transport = ChaosTransport([Fault("kill", 2, count=2)])
    assert isinstance(run_with_faults(cfg, out, transport, catch=(Killed,)).error, Killed)
    # Every participant booked its round-2 release before anything was sent (write-ahead), and one
    # message had left when the process died.
    assert len(transport.released) == 3 + 1
    for pid in IDS:
        assert [e["round"] for e in ledger_releases(out, pid) if e["payload"] == "logits"] == [1, 2]
    assert_ledgers_cover_releases(out, transport)
    resumed = run_with_faults(cfg, out, ChaosTransport([]), resume=True)
    assert resumed.summary is not None
    assert_ledgers_cover_releases(out, resumed.transport)
    for pid in IDS:
        # The cut round's spend is kept and the replayed round books again: calibrated for 3 releases,
        # every participant stops at its 4th instead of overspending.
        assert [e["round"] for e in ledger_releases(out, pid) if e["payload"] == "logits"] == [1, 2, 2]
    for p in resumed.summary["participants"]:
        assert p["epsilon"] <= p["target_epsilon"] + 1e-9 and p["stopped_early"]
    assert main(["audit", str(out)]) == 0


SIGKILL_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    from tests.layers.faults import ChaosTransport, Fault, sigkill
    from tests.reliability.helpers import run_with_faults, small_config

    run_with_faults(small_config(rounds=3), Path(sys.argv[1]), ChaosTransport([Fault("kill", 2, count=2)], die=sigkill))
""")


def test_a_process_sigkilled_mid_round_resumes_to_the_uninterrupted_state(references: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", SIGKILL_SCRIPT, str(out)], env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["round"] == 1
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    resumed = run_with_faults(small_config(rounds=3), out, ChaosTransport([]), resume=True)
    assert resumed.summary is not None
    assert metrics_without_time(out) == metrics_without_time(references["plain3"])


# ----- the harness itself -------------------------------------------------------------------------------
def test_the_random_schedule_is_seeded_and_respects_its_limits() -> None:
    kwargs: dict[str, Any] = {"rounds": range(1, 31), "parties": [f"p{i}" for i in range(5)], "rate": 0.4,
                              "sealed": True, "kills": 2, "max_offline": 1}
    a, b = random_schedule(7, **kwargs), random_schedule(7, **kwargs)
    assert a == b and a != random_schedule(8, **kwargs)
    assert sum(f.kind == "kill" for f in a) == 2 and all(1 < f.round < 30 for f in a if f.kind == "kill")
    for rnd in range(1, 31):
        assert sum(f.round == rnd and f.kind.startswith("drop") for f in a) <= 1
    # Sealed uplinks: plaintext corruptions can only happen inside the participant.
    assert all(f.at == "model" for f in a if f.kind in ("nan", "inf", "wrong_shape", "wrong_dtype"))
    assert len({f.kind for f in a}) >= 8


@pytest.mark.parametrize("protocol,secure", [("heterofl", "none"), ("heterofl", "ckks"), ("fedgen", "ckks")])
def test_a_replica_that_lost_an_update_is_sent_it_again_and_rejoins_the_others(
        tmp_path: Path, protocol: str, secure: str) -> None:
    """p2's round-1 update is lost (delayed, then refused as stale). Its replica stays at the version before
    (never skipping one); its round-2 uplink says so, the server sends both updates again, and by the end
    every replica of the global state is identical."""
    changes: dict[str, Any] = {"protocol": protocol, "heterofl": {"norm": "gn", "hidden_sizes": [16, 16]},
                               "fedgen": {"local_steps": 2, "generator_steps": 2}}
    from securefl.protocols import get_protocol

    end_of_round = get_protocol(protocol).downlink.kind
    transport = ChaosTransport([Fault("delay", 1, "p2", downlink=True, message_kind=end_of_round)])
    outcome = run_with_faults(small_config(secure=secure, rounds=3, **changes), tmp_path / "run", transport)
    assert outcome.summary is not None
    assert "stale" in _only_rejection(outcome, sender=AGGREGATOR, receiver="p2")
    proto = outcome.fed.protocol
    replicas = [proto.replica(p) for p in outcome.fed.parties]
    assert [r.version for r in replicas] == [3, 3, 3]
    states = [replica_state(r) for r in replicas]
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        for name in state:
            torch.testing.assert_close(state[name], states[0][name], rtol=0, atol=0)


def replica_state(replica: Any) -> dict[str, torch.Tensor]:
    modules = {name: value for name, value in vars(replica).items() if isinstance(value, torch.nn.Module)}
    tensors = {name: value for name, value in vars(replica).items() if isinstance(value, torch.Tensor)}
    return {**{f"{m}.{k}": v for m, module in modules.items() for k, v in module.state_dict().items()}, **tensors}
