"""The audit recomputes ε twice and flags over-budget, mismatched and unsealed ledgers."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest

from securefl.privacy import accountants
from securefl.privacy.accountants import RdpAccountant
from securefl.privacy.audit import audit_ledger, audit_run
from securefl.privacy.events import PrivacyEvent
from securefl.privacy.ledger import Ledger

from .helpers import DELTA, key_from_seed, read_entries, rechain, write_lines, write_sealed_ledger

KEY = key_from_seed(7)


def pinned(**keys: object) -> dict[str, str]:
    """Participant → hex public key, as a roster outside the run directory gives them to the audit."""
    return {pid: key.public_key().public_bytes_raw().hex() for pid, key in keys.items()}  # type: ignore[attr-defined]


def test_honest_run_with_every_accountant_passes(tmp_path: Path) -> None:
    for i, name in enumerate(["rdp", "pld", "prv"]):
        write_sealed_ledger(tmp_path, f"h{i}", key_from_seed(i), accountant=name)
    report = audit_run(tmp_path, public_keys=pinned(**{f"h{i}": key_from_seed(i) for i in range(3)}))
    assert report.ok, report.format_table()
    assert all(r.pinned for r in report.rows) and report.unpinned == []
    assert {(r.participant, r.unit) for r in report.rows} == {(f"h{i}", u) for i in range(3) for u in ("participant", "record")}
    by = {(r.participant, r.unit): r for r in report.rows}
    rdp_row = by[("h0", "record")]
    assert rdp_row.accountant == "rdp" and rdp_row.independent_accountant == "pld"
    assert rdp_row.epsilon_independent < rdp_row.epsilon_reported  # PLD is tighter than RDP
    assert rdp_row.epsilon_recomputed == rdp_row.epsilon_reported
    assert by[("h1", "record")].independent_accountant == "rdp"
    assert by[("h2", "record")].independent_accountant == "rdp"
    assert rdp_row.target == 8.0 and rdp_row.delta == DELTA and rdp_row.relation == "add_remove"

    table = report.format_table()
    assert "ε reported" in table and "result: OK" in table and "record (add_remove)" in table
    md = report.to_markdown()
    assert md.startswith("## Privacy audit") and "| participant |" in md and "**Result: OK**" in md
    data = json.loads(report.to_json())
    assert data["ok"] is True and len(data["rows"]) == 6


def test_quick_recheck_gives_the_same_verdict(tmp_path: Path) -> None:
    write_sealed_ledger(tmp_path, "h1", KEY, accountant="pld")
    full = audit_run(tmp_path, public_keys=pinned(h1=KEY))
    quick = audit_run(tmp_path, full_recheck=False, public_keys=pinned(h1=KEY))
    assert full.ok and quick.ok
    assert [r.epsilon_recomputed for r in full.rows] == [r.epsilon_recomputed for r in quick.rows]


def test_over_budget_is_flagged(tmp_path: Path) -> None:
    # A participant holding its own key can write a consistent, signed ledger
    # whose spend exceeds the budget in its own header; the audit must say so.
    path = write_sealed_ledger(tmp_path, "h1", KEY, max_epsilon=8.0)
    entries = read_entries(path)
    entries[0]["max_epsilon"] = 1.0
    write_lines(path, rechain(entries, key=KEY))
    report = audit_run(tmp_path)
    assert not report.ok
    statuses = {r.unit: r.status for r in report.rows}
    assert statuses["record"] == "over_budget"
    assert any("exceeds the budget 1" in reason for r in report.rows for reason in r.reasons)


def test_misreported_epsilon_is_a_mismatch(tmp_path: Path) -> None:
    path = write_sealed_ledger(tmp_path, "h1", KEY)
    entries = read_entries(path)
    entries[3]["epsilon_after"] *= 0.9
    entries[3]["epsilon_by_unit"]["record"] *= 0.9
    write_lines(path, rechain(entries, key=KEY))  # validly signed by the (lying) participant
    rows = audit_ledger(path)
    assert {r.status for r in rows} == {"mismatch"}
    assert any("line 4" in reason and "recomputes" in reason for r in rows for reason in r.reasons)


def test_independent_accountant_catches_a_wrong_analysis(tmp_path: Path, monkeypatch) -> None:
    # A buggy RDP analysis under-counts by half. Ledger and same-accountant
    # recomputation agree (same bug); only the independent accountant can tell.
    real = RdpAccountant._compose

    def buggy(self, groups, *, relation, delta):  # type: ignore[no-untyped-def]
        return 0.5 * real(self, groups, relation=relation, delta=delta)

    monkeypatch.setattr(RdpAccountant, "_compose", buggy)
    monkeypatch.setattr(accountants, "_MEMO", OrderedDict())  # keep buggy results out of the shared memo
    event = PrivacyEvent.dp_sgd(noise_multiplier=1.2345, sample_rate=0.0321, steps=300)  # not memoised elsewhere
    with Ledger.open(
        tmp_path / "ledgers" / "h1.jsonl", participant="h1", max_epsilon=20.0, delta=DELTA, signing_key=KEY
    ) as ledger:
        ledger.commit(event, round=0)
        ledger.seal(KEY)
    report = audit_run(tmp_path)
    (row,) = report.rows
    assert row.status == "mismatch", report.format_table()
    assert row.epsilon_recomputed == row.epsilon_reported
    assert any("independent pld" in reason for reason in row.reasons)


def test_events_only_pld_can_analyse_get_a_note_not_a_failure(tmp_path: Path) -> None:
    event = PrivacyEvent(
        unit="record",
        mechanism="subsampled_gaussian",
        noise_multiplier=1.5,
        sample_rate=0.02,
        steps=50,
        sensitivity=2.0,
        relation="replace_one",
        payload="dp_sgd",
    )
    with Ledger.open(
        tmp_path / "ledgers" / "h1.jsonl", participant="h1", max_epsilon=8.0, delta=DELTA, signing_key=KEY, accountant="pld"
    ) as ledger:
        ledger.commit(event, round=0)
        ledger.seal(KEY)
    report = audit_run(tmp_path, public_keys=pinned(h1=KEY))
    (row,) = report.rows
    assert report.ok and row.epsilon_independent is None
    assert any("no independent accountant" in reason for reason in row.reasons)


def test_participant_without_releases(tmp_path: Path) -> None:
    with Ledger.open(
        tmp_path / "ledgers" / "h1.jsonl", participant="h1", max_epsilon=8.0, delta=DELTA, signing_key=KEY
    ) as ledger:
        ledger.seal(KEY)
    report = audit_run(tmp_path, public_keys=pinned(h1=KEY))
    (row,) = report.rows
    assert report.ok and row.unit is None and row.epsilon_reported == 0.0


def test_a_ledger_no_outside_key_confirms_is_unpinned_and_fails_unless_allowed(tmp_path: Path) -> None:
    # Nothing outside the run directory vouches for the key: whoever wrote the directory could have re-sealed it.
    write_sealed_ledger(tmp_path, "h1", KEY)
    report = audit_run(tmp_path)
    assert not report.ok and {r.status for r in report.rows} == {"unpinned"} and report.unpinned == ["h1"]
    table = report.format_table()
    assert "WARNING: UNPINNED" in table
    assert any(line.startswith("h1") and line.endswith("UNPINNED") for line in table.splitlines())
    assert "result: FAILED" in table
    allowed = audit_run(tmp_path, allow_unpinned=True)
    assert allowed.ok and "result: OK, but UNPINNED" in allowed.format_table()
    data = json.loads(allowed.to_json())
    assert data["unpinned"] == ["h1"] and data["warnings"] and not data["rows"][0]["pinned"]


def test_unsealed_run_fails(tmp_path: Path) -> None:
    write_sealed_ledger(tmp_path, "h1", KEY, seal=False)
    report = audit_run(tmp_path)
    assert not report.ok and {r.status for r in report.rows} == {"unsealed"}
    assert "result: FAILED" in report.format_table()


def test_empty_or_missing_ledger_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ledgers"):
        audit_run(tmp_path)
    (tmp_path / "ledgers").mkdir()
    report = audit_run(tmp_path)
    assert not report.ok and report.rows == () and "nothing was verified" in report.format_table()


def test_tolerances_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="independent_rtol"):
        audit_run(tmp_path, independent_rtol=-1.0)
