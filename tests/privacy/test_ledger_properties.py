"""Properties over random schedules: never over budget, never under-counted.

Hypothesis draws targets, schedules of releases, dropouts and crash points.
A refused release never happens; a crash between commit and release loses the
payload but never the spend.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from securefl.privacy.accountants import get_accountant
from securefl.privacy.calibration import calibrate_noise_multiplier
from securefl.privacy.errors import BudgetExceeded
from securefl.privacy.events import PrivacyEvent, PublicDataEvent
from securefl.privacy.ledger import Ledger, read_ledger
from securefl.privacy.mechanisms import distributed_event

from .helpers import key_from_seed

SETTINGS = settings(max_examples=20, deadline=None, database=None)

# σ and q come from small grids: the properties are about schedules, and a
# grid lets the accountants' memo make hundreds of commits cheap.
record_events = st.builds(
    lambda sigma, q, steps: PrivacyEvent.dp_sgd(noise_multiplier=sigma, sample_rate=q, steps=steps),
    sigma=st.sampled_from([0.6, 0.8, 1.0, 1.5, 2.0, 3.0]),
    q=st.sampled_from([0.005, 0.02, 0.05, 0.1, 0.2]),
    steps=st.integers(1, 400),
)
participant_events = st.builds(
    lambda sigma, n, m: distributed_event(
        clip_norm=1.0, noise_multiplier=sigma, relation="replace_one", n_planned=n, n_actual=min(m, n)
    ),
    sigma=st.floats(0.5, 6.0),
    n=st.integers(2, 10),
    m=st.integers(1, 10),  # dropouts: fewer contributors, weaker sum
)
releases = st.one_of(record_events, participant_events, st.just(PublicDataEvent(payload="public_logits")))


@dataclass
class Run:
    ledger: Ledger
    stopped: set[str]


def open_ledger(path: Path, participant: str, target: float, delta: float, budgets: dict) -> Ledger:
    return Ledger.open(
        path,
        participant=participant,
        max_epsilon=target,
        delta=delta,
        unit_budgets=budgets,
        signing_key=key_from_seed(len(participant)),
    )


@SETTINGS
@given(
    targets=st.lists(st.floats(0.5, 8.0), min_size=1, max_size=3),
    participant_budget=st.one_of(st.none(), st.floats(0.3, 4.0)),
    log_delta=st.floats(-7.0, -4.0),
    schedule=st.lists(st.tuples(st.integers(0, 2), releases, st.booleans()), min_size=1, max_size=25),
)
def test_final_epsilon_never_exceeds_target(targets, participant_budget, log_delta, schedule) -> None:
    delta = 10.0**log_delta
    budgets = {} if participant_budget is None else {"participant": participant_budget}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [Run(open_ledger(Path(tmp) / f"p{i}.jsonl", f"p{i}", t, delta, budgets), set()) for i, t in enumerate(targets)]
        released: dict[int, list] = {i: [] for i in range(len(runs))}
        for rnd, (who, event, drops_out) in enumerate(schedule):
            if who >= len(runs) or drops_out:
                continue  # dropout: nothing released, nothing spent
            run = runs[who]
            unit = getattr(event, "unit", None)
            if unit in run.stopped:
                continue
            if run.ledger.would_exceed(event):
                with_budget = run.ledger.budget(unit)
                try:
                    run.ledger.commit(event, round=rnd)
                except BudgetExceeded as exc:
                    assert exc.budget == with_budget
                else:
                    raise AssertionError("would_exceed said yes but commit accepted")
                run.stopped.add(unit)  # the participant stops contributing for this unit
                continue
            run.ledger.commit(event, round=rnd)
            released[who].append(event)
        accountant = get_accountant("rdp")
        for i, run in enumerate(runs):
            for unit in ("record", "participant"):
                spent = run.ledger.epsilon(unit)
                assert spent <= run.ledger.budget(unit)
                assert spent == accountant.epsilon(
                    [e for e in released[i] if getattr(e, "unit", None) == unit and isinstance(e, PrivacyEvent)],
                    delta=delta,
                )
            run.ledger.seal(key_from_seed(len(run.ledger.participant)))
            assert read_ledger(run.ledger.path).sealed
            run.ledger.close()


@settings(max_examples=15, deadline=None, database=None)
@given(
    target=st.floats(1.0, 10.0),
    schedule=st.lists(st.tuples(record_events, st.sampled_from(["release", "crash_before_release"])), max_size=12),
)
def test_crash_between_commit_and_release_never_under_counts(target, schedule) -> None:
    delta = 1e-5
    accountant = get_accountant("rdp")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p0.jsonl"
        ledger = open_ledger(path, "p0", target, delta, {})
        left: list[PrivacyEvent] = []  # payloads that actually left the participant
        committed: list[PrivacyEvent] = []
        for rnd, (event, fate) in enumerate(schedule):
            try:
                ledger.commit(event, round=rnd)
            except BudgetExceeded:
                continue
            committed.append(event)
            if fate == "release":
                left.append(event)
                continue
            # The process dies after the durable commit, before the send.
            ledger.close()
            del ledger
            ledger = open_ledger(path, "p0", target, delta, {})
            reopened = ledger.epsilon("record")
            assert reopened >= accountant.epsilon(left, delta=delta)  # never under-counts
            assert reopened == accountant.epsilon(committed, delta=delta)  # over-counts by exactly the lost one
            assert reopened <= target
        ledger.close()


@settings(max_examples=8, deadline=None, database=None)
@given(
    target=st.floats(0.5, 10.0),
    log_delta=st.floats(-7.0, -4.0),
    q=st.floats(0.01, 0.05),
    steps=st.integers(10, 300),
    rounds=st.integers(1, 8),
    skipped=st.sets(st.integers(0, 7)),
)
def test_calibrated_plan_runs_to_completion_within_target(target, log_delta, q, steps, rounds, skipped) -> None:
    # The spec's guarantee: calibrate before round 1, run the plan (some rounds
    # dropped), end at or under the target — and the ledger never has to refuse.
    delta = 10.0**log_delta
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=delta, sample_rate=q, steps=steps, releases=rounds, tolerance=1e-2
    )
    with tempfile.TemporaryDirectory() as tmp:
        with open_ledger(Path(tmp) / "p0.jsonl", "p0", target, delta, {}) as ledger:
            for rnd in range(rounds):
                if rnd in skipped:
                    continue
                event = PrivacyEvent.dp_sgd(noise_multiplier=sigma, sample_rate=q, steps=steps)
                assert not ledger.would_exceed(event)
                ledger.commit(event, round=rnd)
            assert ledger.epsilon() <= target
