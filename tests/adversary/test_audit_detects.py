"""Finding 9: the audit must check that a ledger covers every release, not only that it agrees with itself.

Written as the reader of a run directory (an auditor, a leaked backup, or a data owner holding its own key) who
edits a participant's ledger and re-seals it, and as a runtime that lets a release leave unbooked. Each edit makes a
ledger that is self-consistent, so an audit that only re-reads the ledger passes it. ``securefl audit`` must fail,
naming the cause:

- a release removed and the ledger re-sealed: the owners' private keys are not in the run directory, so the reader
  re-seals with a key of its own; the pinned key catches it, and the record of what left catches it even unpinned;
- an entry booking another σ than the calibrated one;
- a delivered release with no entry (here re-sealed with the owner's own key, so only the record can tell);
- δ ≥ 1/n;
- an independent (tight) ε above the target.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefl.cli import main
from securefl.privacy.events import PrivacyEvent
from securefl.privacy.ledger import Ledger, public_key_path, read_ledger
from securefl.runtime.federation import Federation
from tests.conftest import tiny_config

# Participant-level DP: every round's logits are one ledger entry of that round and kind.
RUN: dict[str, Any] = {
    "privacy": {"unit": "participant", "delta": 1e-5, "target_epsilon": 8.0},
    "participants": [{"id": "p0", "model": "mlp_s"}, {"id": "p1", "model": "mlp_s"}],
    "run": {"rounds": 2},
}


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One honest private run, and the key store its owners' keys went to (outside the run directory)."""
    keys = tmp_path_factory.mktemp("owner-keys")
    run = tmp_path_factory.mktemp("honest") / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SECUREFL_KEYS", str(keys))
        Federation(tiny_config(**RUN), run, progress=False).run()
    return run, keys


@pytest.fixture
def run_dir(honest: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the honest run to attack; the auditor's machine has the run's key store."""
    run, keys = honest
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    monkeypatch.setenv("SECUREFL_KEYS", str(keys))
    return copy


def _load_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def key_in_run_dir(run: Path, pid: str) -> Ed25519PrivateKey | None:
    """What a reader of the run directory can get: the owner's private key, if it lies there."""
    found = sorted(run.rglob(f"{pid}.ed25519"))
    return _load_key(found[0]) if found else None


def owners_key(run: Path, pid: str) -> Ed25519PrivateKey:
    """The owner's own key (a dishonest owner, or a leaked key store): wherever the run keeps it."""
    key = key_in_run_dir(run, pid)
    if key is None:
        found = sorted(Path(os.environ["SECUREFL_KEYS"]).rglob(f"{pid}.ed25519"))
        key = _load_key(found[0])
    return key


def reseal(path: Path, key: Ed25519PrivateKey, *, drop: Callable[[dict[str, Any]], bool] = lambda e: False,
           sigma_factor: float = 1.0, delta: float | None = None) -> None:
    """Rewrite a ledger through the Ledger API (so every hash and running ε is right) and seal it with ``key``."""
    contents = read_ledger(path)
    header = contents.header
    forged = path.with_name("forged.jsonl")
    releases = [e for e in contents.entries if e["kind"] == "release"]
    with Ledger.open(forged, participant=header["participant"], max_epsilon=header["max_epsilon"],
                     delta=header["delta"] if delta is None else delta, signing_key=key,
                     unit_budgets=header["unit_budgets"], accountant=header["accountant"]) as ledger:
        for entry, event in zip(releases, contents.events, strict=True):
            if drop(entry):
                continue
            if isinstance(event, PrivacyEvent) and sigma_factor != 1.0:
                event = event.model_copy(update={"noise_multiplier": event.noise_multiplier * sigma_factor})
            ledger.commit(event, round=entry["round"])
        ledger.seal(key)
    os.replace(forged, path)
    os.replace(public_key_path(forged), public_key_path(path))


def logits_of_round(rnd: int) -> Callable[[dict[str, Any]], bool]:
    return lambda entry: entry["round"] == rnd and entry["payload"] == "logits"


def audit(run: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["audit", str(run), *args])
    return code, capsys.readouterr().out


def test_a_release_removed_and_resealed_fails_the_audit(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = run_dir / "ledgers" / "p1.jsonl"
    assert audit(run_dir, capsys)[0] == 0  # the honest run passes
    key = key_in_run_dir(run_dir, "p1") or Ed25519PrivateKey.generate()
    reseal(ledger, key, drop=logits_of_round(2))
    code, out = audit(run_dir, capsys)
    assert code == 1, out
    assert "differs from the pinned public key" in out  # the key store outside the run pins the owner's key
    assert "round 2: 'p1' sent a 'logits' release" in out  # and the record of what left names the release
    # The reader cannot have the owner's key: no private key is anywhere in the run directory.
    assert sorted(p.name for p in run_dir.rglob("*.ed25519")) == []
    # Even where no outside key is at hand (and unpinned seals are let through), the record catches it.
    monkeypatch.setenv("SECUREFL_KEYS", str(tmp_path / "elsewhere"))
    code, out = audit(run_dir, capsys, "--allow-unpinned")
    assert code == 1 and "WARNING: UNPINNED" in out, out
    assert "round 2: 'p1' sent a 'logits' release to 'aggregator', and its ledger has no participant-level entry " \
           "of round 2 for 'logits'" in out


def test_a_delivered_release_without_an_entry_fails_the_audit(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Re-sealed with the owner's own key, so the seal is valid and pinned: only the record of what left can tell.
    reseal(run_dir / "ledgers" / "p1.jsonl", owners_key(run_dir, "p1"), drop=logits_of_round(1))
    code, out = audit(run_dir, capsys, "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"], out
    rows = [r for r in report["rows"] if r["participant"] == "p1"]
    assert rows and all(r["status"] == "unbooked" and r["pinned"] for r in rows), out
    assert any("round 1: 'p1' sent a 'logits' release" in reason for r in rows for reason in r["reasons"])
    assert all(r["status"] == "ok" for r in report["rows"] if r["participant"] == "p0")
    # Deleting the record as well hides nothing: a private run without it fails.
    (run_dir / "releases.jsonl").unlink()
    code, out = audit(run_dir, capsys)
    assert code == 1 and "releases.jsonl is missing" in out, out


def test_an_entry_booking_another_sigma_than_calibrated_fails_the_audit(run_dir: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # Claim three times the noise that was drawn: a third of the ε, booked and sealed by the owner's own key.
    reseal(run_dir / "ledgers" / "p1.jsonl", owners_key(run_dir, "p1"), sigma_factor=3.0)
    code, out = audit(run_dir, capsys)
    assert code == 1, out
    assert "but the calibrated σ of 'p1' is" in out and "round 1, entry" in out


def test_a_delta_of_one_half_fails_the_audit(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # δ = 0.5 makes almost any ε true: the mechanism may publish a participant outright half of the time.
    reseal(run_dir / "ledgers" / "p1.jsonl", owners_key(run_dir, "p1"), delta=0.5)
    code, out = audit(run_dir, capsys, "--json")
    report = json.loads(out)
    assert code == 1, out
    p1 = [r for r in report["rows"] if r["participant"] == "p1"]
    assert p1 and all(r["status"] != "ok" for r in p1)
    assert any("δ=0.5 ≥ 1/n" in reason for r in p1 for reason in r["reasons"]), out


def test_an_independent_epsilon_above_the_target_fails_the_audit(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # PLD reports 1.9514 for these steps, PRV (also a valid upper bound) 1.9616: with a target between them,
    # the reported ε is under it and the two agree within the audit's tolerance, yet PRV says the target is not met.
    key = Ed25519PrivateKey.generate()
    event = PrivacyEvent.dp_sgd(noise_multiplier=1.5, sample_rate=0.04, steps=225)
    with Ledger.open(tmp_path / "run" / "ledgers" / "h1.jsonl", participant="h1", max_epsilon=1.955, delta=1e-5,
                     signing_key=key, accountant="pld") as ledger:
        ledger.commit(event, round=1)
        ledger.seal(key)
    roster = tmp_path / "officer" / "roster"
    roster.mkdir(parents=True)
    (roster / "h1.pub").write_bytes(key.public_key().public_bytes_raw())
    code, out = audit(tmp_path / "run", capsys, "--roster", str(tmp_path / "officer"))
    assert code == 1, out
    assert "independent prv ε=" in out and "exceeds the target 1.955" in out
