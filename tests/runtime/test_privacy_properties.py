"""Hypothesis, through the whole runtime: random targets, schedules, dropouts and crashes never overspend."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securefl.core.message import AGGREGATOR
from securefl.privacy.ledger import read_ledger
from securefl.runtime.federation import Federation
from tests.conftest import tiny_config
from tests.layers.faults import FaultyTransport


class Crash(Exception):
    pass


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    unit=st.sampled_from(["record", "participant"]),
    targets=st.lists(st.floats(0.5, 10.0), min_size=3, max_size=3),
    rounds=st.integers(1, 3),
    participation=st.sampled_from([2 / 3, 1.0]),
    dropped=st.sets(st.sampled_from(["p0", "p1", "p2"]), max_size=1),
    crash_after=st.one_of(st.none(), st.integers(0, 2)),
)
def test_final_epsilon_never_exceeds_target_and_resume_never_under_counts(
        unit: str, targets: list[float], rounds: int, participation: float, dropped: set[str],
        crash_after: int | None) -> None:
    cfg = tiny_config(
        privacy={"unit": unit, "clip_norm": 5.0},
        run={"rounds": rounds, "participation": participation},
        participants=[{"id": f"p{i}", "model": "mlp_s", "target_epsilon": t} for i, t in enumerate(targets)],
        fedmd={"transfer_max_epochs": 2},
    )
    # A participant whose uplink never arrives (it dropped after releasing): its spend still counts.
    def transport() -> FaultyTransport:
        return FaultyTransport(lambda m: m.receiver == AGGREGATOR and m.sender in dropped, lambda m: [])

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        spent_before_crash: dict[str, float] = {}
        if crash_after is not None and crash_after < rounds:
            def crash(rnd: int) -> None:
                if rnd == crash_after + 1:
                    raise Crash

            fed = Federation(cfg, out, progress=False, transport=transport(), on_round_end=crash)
            try:
                fed.run()
            except Crash:
                pass
            spent_before_crash = {pid: read_ledger(out / "ledgers" / f"{pid}.jsonl").spend_history()[-1]["epsilon_after"]
                                  for pid in ("p0", "p1", "p2")
                                  if read_ledger(out / "ledgers" / f"{pid}.jsonl").spend_history()}
            Federation(cfg, out, progress=False, transport=transport(), resume=True).run()
        else:
            Federation(cfg, out, progress=False, transport=transport()).run()
        summary = json.loads((out / "summary.json").read_text())
        for p, target in zip(summary["participants"], targets, strict=True):
            assert p["epsilon"] <= target + 1e-9, p
            # Never under-count: after resume the ledger holds at least what it held at the crash.
            assert p["epsilon"] >= spent_before_crash.get(p["id"], 0.0) - 1e-12
