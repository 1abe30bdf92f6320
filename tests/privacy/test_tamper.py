"""Tampering with a ledger is caught by both the audit and Ledger.open."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefl.cli import main
from securefl.privacy.audit import audit_run
from securefl.privacy.errors import LedgerCorrupt, LedgerMismatch
from securefl.privacy.ledger import Ledger, canonical_json, entry_hash, public_key_path

from .helpers import DELTA, key_from_seed, read_entries, rechain, write_lines, write_sealed_ledger

KEY = key_from_seed(7)
# The owners' public keys as a roster outside the run directory gives them: what the audit pins seals to.
PINNED = {pid: key.public_key().public_bytes_raw().hex() for pid, key in (("h1", KEY), ("h2", key_from_seed(8)))}


def reopen(path: Path, key: Ed25519PrivateKey = KEY) -> Ledger:
    return Ledger.open(path, participant="h1", max_epsilon=8.0, delta=DELTA, signing_key=key)


@pytest.fixture
def sealed(tmp_path: Path) -> Path:
    write_sealed_ledger(tmp_path, "h1", KEY)
    write_sealed_ledger(tmp_path, "h2", key_from_seed(8))  # an untouched neighbour
    return tmp_path / "ledgers" / "h1.jsonl"


def edit_value(path: Path) -> None:
    entries = read_entries(path)
    entries[2]["noise_multiplier"] = 40.0  # pretend the logits were noised much more
    write_lines(path, entries)


def edit_epsilon(path: Path) -> None:
    entries = read_entries(path)
    entries[3]["epsilon_after"] = 0.01
    write_lines(path, entries)


def edit_and_rehash_chain(path: Path) -> None:
    # A forger without the key can recompute every hash; only the seal stops it.
    entries = read_entries(path)
    entries[1]["steps"] = 1
    write_lines(path, rechain(entries, key=None))


def delete_line(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    del lines[2]
    path.write_text("".join(lines))


def reorder_lines(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[1], lines[3] = lines[3], lines[1]
    path.write_text("".join(lines))


def truncate_last_line(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def change_signature(path: Path) -> None:
    entries = read_entries(path)
    seal = entries[-1]
    sig = bytearray.fromhex(seal["signature"])
    sig[0] ^= 0x01
    seal["signature"] = sig.hex()
    seal["hash"] = entry_hash(seal)  # keep the chain intact: only the signature is wrong
    write_lines(path, entries)


def reformat_line(path: Path) -> None:
    lines = path.read_text().splitlines()
    lines[1] = json.dumps(json.loads(lines[1]), indent=1).replace("\n", " ")
    path.write_text("\n".join(lines) + "\n")


def swap_public_key_file(path: Path) -> None:
    public_key_path(path).write_text(key_from_seed(3).public_key().public_bytes_raw().hex() + "\n")


TAMPERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "edit_value": (edit_value, "line 3"),
    "edit_epsilon": (edit_epsilon, "line 4"),
    "edit_and_rehash_chain": (edit_and_rehash_chain, "signature"),
    "delete_line": (delete_line, "line 3"),
    "reorder_lines": (reorder_lines, "line 2"),
    "truncate_last_line": (truncate_last_line, "incomplete"),
    "change_signature": (change_signature, "signature"),
    "reformat_line": (reformat_line, "canonical"),
    "swap_public_key_file": (swap_public_key_file, "public key file"),
}


def test_untampered_sealed_ledger_passes(sealed: Path) -> None:
    report = audit_run(sealed.parent.parent, public_keys=PINNED)
    assert report.ok, report.format_table()
    reopen(sealed).close()


@pytest.mark.parametrize("name", list(TAMPERS))
def test_tampering_is_detected(sealed: Path, name: str) -> None:
    tamper, where = TAMPERS[name]
    tamper(sealed)
    report = audit_run(sealed.parent.parent, public_keys=PINNED)
    assert not report.ok
    h1 = [r for r in report.rows if r.participant == "h1"]
    assert h1 and all(r.status == "tampered" for r in h1), report.format_table()
    assert any(where in reason for r in h1 for reason in r.reasons), report.format_table()
    assert all(r.status == "ok" for r in report.rows if r.participant == "h2")
    with pytest.raises(LedgerCorrupt) as info:
        reopen(sealed).close()
    assert str(sealed) in str(info.value) and where in str(info.value)


def test_removing_the_seal_fails_the_audit(sealed: Path) -> None:
    lines = sealed.read_text().splitlines(keepends=True)
    sealed.write_text("".join(lines[:-1]))
    report = audit_run(sealed.parent.parent)
    assert not report.ok
    assert {r.status for r in report.rows if r.participant == "h1"} == {"unsealed"}
    # Resuming an unsealed ledger is what a crashed run looks like, so it opens;
    # its spend is still the full chain's.
    with reopen(sealed) as ledger:
        assert not ledger.sealed


def rewrite_with_a_forger_key(sealed: Path, *, understate_steps: bool = True) -> None:
    forger = key_from_seed(66)
    entries = read_entries(sealed)
    forger_pub = forger.public_key().public_bytes_raw().hex()
    entries[0]["public_key"] = forger_pub
    entries[-1]["public_key"] = forger_pub
    if understate_steps:
        entries[1]["steps"] = 1
    write_lines(sealed, rechain(entries, key=forger))
    public_key_path(sealed).write_text(forger_pub + "\n")


def test_full_rewrite_with_a_forger_key(sealed: Path) -> None:
    rewrite_with_a_forger_key(sealed)
    run = sealed.parent.parent
    # Self-consistent, so only a pinned key (e.g. the run's key registry) catches it.
    pinned = {"h1": KEY.public_key().public_bytes_raw().hex()}
    report = audit_run(run, public_keys=pinned)
    assert {r.status for r in report.rows if r.participant == "h1"} == {"tampered"}
    with pytest.raises(LedgerMismatch, match="signing_key"):
        reopen(sealed).close()


def test_the_audit_command_pins_ledger_keys_to_a_roster(sealed: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`securefl audit RUN --roster KEY_DIR`: the keys a privacy officer checked with each owner decide."""
    run = sealed.parent.parent
    officer = tmp_path / "officer"
    (officer / "roster").mkdir(parents=True)
    for pid, key in (("h1", KEY), ("h2", key_from_seed(8))):
        (officer / "roster" / f"{pid}.pub").write_bytes(key.public_key().public_bytes_raw())
    assert main(["audit", str(run), "--roster", str(officer)]) == 0
    rewrite_with_a_forger_key(sealed, understate_steps=False)  # the same spend, sealed by someone else
    capsys.readouterr()
    # Self-consistent: nothing inside the run can tell, so without a roster the audit refuses to vouch for it...
    assert main(["audit", str(run)]) == 1
    assert "WARNING: UNPINNED" in capsys.readouterr().out
    # ...and passes it only when told to, still flagging it.
    assert main(["audit", str(run), "--allow-unpinned"]) == 0
    assert "OK, but UNPINNED" in capsys.readouterr().out
    assert main(["audit", str(run), "--roster", str(officer)]) == 1
    assert "differs from the pinned public key" in capsys.readouterr().out
    (officer / "roster" / "h2.pub").unlink()
    assert main(["audit", str(run), "--roster", str(officer)]) == 2
    assert "no public key for 'h2' in the roster" in capsys.readouterr().err


def test_rollback_to_an_earlier_seal_needs_the_recorded_head(sealed: Path) -> None:
    with reopen(sealed) as ledger:
        ledger.commit(ledger.events[0], round=9)  # type: ignore[arg-type]
        ledger.seal(KEY)
        final_head = ledger.head
    lines = sealed.read_text().splitlines(keepends=True)
    sealed.write_text("".join(lines[:-2]))  # back to the first seal: a valid, signed, smaller spend
    run = sealed.parent.parent
    assert audit_run(run, public_keys=PINNED).ok  # nothing inside the file can tell...
    report = audit_run(run, public_keys=PINNED, expected_heads={"h1": final_head})  # ...an external record can
    assert {r.status for r in report.rows if r.participant == "h1"} == {"tampered"}


def test_two_ledgers_for_one_participant(sealed: Path) -> None:
    copy = sealed.with_name("h1-copy.jsonl")
    copy.write_bytes(sealed.read_bytes())
    public_key_path(copy).write_bytes(public_key_path(sealed).read_bytes())
    report = audit_run(sealed.parent.parent)
    assert not report.ok
    assert all(r.status == "tampered" for r in report.rows if r.participant == "h1")


def test_line_numbers_are_one_based_and_named(sealed: Path) -> None:
    entries = read_entries(sealed)
    entries[1]["round"] = 5
    sealed.write_text("".join(canonical_json(e) + "\n" for e in entries))
    with pytest.raises(LedgerCorrupt) as info:
        reopen(sealed)
    assert info.value.line == 2 and info.value.path == str(sealed)
