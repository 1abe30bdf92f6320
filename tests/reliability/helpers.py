"""Shared pieces of the reliability tests: a federation with the validation layer, small configs, checks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securefl.config import deep_merge, parse_config
from securefl.privacy.audit import audit_run
from securefl.privacy.ledger import read_ledger
from securefl.runtime.federation import Federation
from tests.conftest import tiny_raw
from tests.layers.faults import ChaosTransport

IDS = ("p0", "p1", "p2")


# The validation layer is now first in every stack (securefl/layers/stack.py); the name stays for the tests.
ValidatedFederation = Federation


def small_config(*, secure: str = "none", dp: bool = False, signing: bool = True, rounds: int = 2,
                 n: int = 3, partition: dict[str, Any] | None = None, **changes: Any) -> Any:
    """Three mlp_s participants on digits, FedMD with a 60-record alignment set: about 0.3 s a round."""
    participant = {"model": "mlp_s", **({"target_epsilon": 4.0} if dp else {})}
    raw: dict[str, Any] = {
        "participants": [{"id": f"p{i}", **participant} for i in range(n)],
        "fedmd": {"alignment_size": 60, "transfer_max_epochs": 2, "revisit_epochs": 1},
        "run": {"rounds": rounds},
        "secure_aggregation": secure,
        "signing": signing,
        # A minimum cohort of t = 2 of 3 (min_cohort(3, 0.6)), so one faulty participant leaves an aggregate the
        # others may open; at the default 0.67, t = ceil(2.01) = 3 and any fault aborts the round.
        "masking": {"threshold_fraction": 0.6},
        "privacy": {"min_contributors": 0.6},
    }
    if dp:
        raw["privacy"] = {"unit": "participant", "clip_norm": 5.0, "min_contributors": 0.6}
    return parse_config(small_raw(raw, changes, partition))


def small_raw(raw: dict[str, Any], changes: dict[str, Any], partition: dict[str, Any] | None = None) -> dict[str, Any]:
    merged = tiny_raw(**deep_merge(raw, changes))
    if partition is not None:
        merged["data"]["partition"] = partition  # replaced, not merged into the default Dirichlet one
    return merged


@dataclass
class Outcome:
    out: Path
    fed: Any
    transport: ChaosTransport
    summary: dict[str, Any] | None = None
    error: BaseException | None = None
    senders: dict[int, list[str]] = field(default_factory=dict)  # round -> senders the aggregator combined
    updated: dict[int, list[str]] = field(default_factory=dict)  # round -> participants that ran client_update

    @property
    def rows(self) -> list[dict[str, Any]]:
        path = self.out / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    @property
    def rejected(self) -> list[dict[str, str]]:
        return [r for row in self.rows for r in row["rejected"]]


def run_with_faults(cfg: Any, out: Path, transport: ChaosTransport, *, resume: bool = False,
                    catch: tuple[type[BaseException], ...] = ()) -> Outcome:
    fed = ValidatedFederation(cfg, out, progress=False, transport=transport, resume=resume)
    transport.attach(fed)
    outcome = Outcome(out=out, fed=fed, transport=transport)
    real_server, real_update = fed.protocol.server_step, fed.protocol.client_update

    def server_step(rnd, replies, aggregator):  # type: ignore[no-untyped-def]
        outcome.senders[rnd] = sorted(r.sender for r in replies)
        return real_server(rnd, replies, aggregator)

    def client_update(party, inbox, rnd):  # type: ignore[no-untyped-def]
        outcome.updated.setdefault(rnd, []).append(party.id)
        return real_update(party, inbox, rnd)

    fed.protocol.server_step = server_step  # type: ignore[method-assign]
    fed.protocol.client_update = client_update  # type: ignore[method-assign]
    try:
        outcome.summary = fed.run()
    except catch as exc:
        outcome.error = exc
    return outcome


def ledger_releases(out: Path, pid: str) -> list[dict[str, Any]]:
    return [e for e in read_ledger(out / "ledgers" / f"{pid}.jsonl").entries if e["kind"] == "release"]


def assert_ledgers_cover_releases(out: Path, transport: ChaosTransport, *, ids: Sequence[str] = IDS) -> None:
    """No ledger under-counts: every payload that left a participant is booked in its ledger for that round,
    and no ledger ever goes over its budget."""
    assert transport.released, "nothing left any participant: the check would be vacuous"
    for pid, rnd in sorted(transport.released):
        booked = [e for e in ledger_releases(out, pid) if e["round"] == rnd and e["payload"] == "logits"]
        assert booked, f"{pid}'s round-{rnd} logits left it but are not in its ledger"
    for pid in ids:
        contents = read_ledger(out / "ledgers" / f"{pid}.jsonl")
        for entry in contents.entries[1:]:
            if entry["kind"] == "release":
                assert entry["epsilon_after"] <= contents.header["max_epsilon"] + 1e-9, entry


def audit_statuses(out: Path) -> set[str]:
    return {row.status for row in audit_run(out).rows}
