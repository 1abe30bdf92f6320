"""The ledger: check, then commit; write-ahead; resume; seal."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from securefl.privacy.accountants import get_accountant
from securefl.privacy.errors import BudgetExceeded, LedgerCorrupt, LedgerLocked, LedgerMismatch, UnsupportedEvent
from securefl.privacy.events import PrivacyEvent, PublicDataEvent
from securefl.privacy.ledger import GENESIS_HASH, Ledger, public_key_path, read_ledger

from .helpers import DELTA, dp_sgd, logits_event

REQUIRED = {
    "seq",
    "round",
    "participant",
    "unit",
    "mechanism",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "sensitivity",
    "relation",
    "payload",
    "accountant",
    "delta",
    "epsilon_after",
    "prev_hash",
    "hash",
}


def open_ledger(path: Path, key: Ed25519PrivateKey, **kwargs: object) -> Ledger:
    params: dict = dict(participant="h1", max_epsilon=8.0, delta=DELTA, signing_key=key)
    params.update(kwargs)
    return Ledger.open(path, **params)


def test_create_writes_header_and_public_key(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "ledgers" / "h1.jsonl"
    with open_ledger(path, key, accountant="pld", unit_budgets={"participant": 2.0}) as ledger:
        header = ledger.entries[0]
        assert header["kind"] == "header" and header["seq"] == 0 and header["prev_hash"] == GENESIS_HASH
        assert (header["participant"], header["max_epsilon"], header["delta"], header["accountant"]) == (
            "h1",
            8.0,
            DELTA,
            "pld",
        )
        assert header["unit_budgets"] == {"participant": 2.0}
        raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
        assert header["public_key"] == raw == ledger.public_key
        assert public_key_path(path).read_text().strip() == raw
        assert ledger.epsilon() == 0.0 and ledger.remaining() == 2.0 and ledger.events == ()


def test_commit_appends_a_chained_durable_entry(tmp_path: Path, key: Ed25519PrivateKey, monkeypatch) -> None:
    path = tmp_path / "h1.jsonl"
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    with open_ledger(path, key) as ledger:
        before = len(synced)
        entry = ledger.commit(dp_sgd(), round=0, payload="dp_sgd")
        assert len(synced) > before  # fsync happened before commit returned
        assert REQUIRED <= set(entry)
        assert entry["seq"] == 1 and entry["prev_hash"] == ledger.entries[0]["hash"] == read_ledger(path).entries[0]["hash"]
        assert entry["epsilon_after"] == pytest.approx(get_accountant("rdp").epsilon([dp_sgd()], delta=DELTA))
        assert json.loads(path.read_text().splitlines()[-1]) == entry
        second = ledger.commit(dp_sgd(), round=1)
        assert second["prev_hash"] == entry["hash"] and second["epsilon_after"] > entry["epsilon_after"]
        assert ledger.head == second["hash"]


def test_failed_write_is_never_counted_as_released(tmp_path: Path, key: Ed25519PrivateKey, monkeypatch) -> None:
    path = tmp_path / "h1.jsonl"
    ledger = open_ledger(path, key)
    ledger.commit(dp_sgd(), round=0)
    eps = ledger.epsilon()

    def broken_fsync(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk gone"):
        ledger.commit(dp_sgd(), round=1)
    monkeypatch.undo()
    # The caller got an exception, so it must not release; and the ledger
    # refuses to write again until it is re-opened and verified.
    with pytest.raises(LedgerCorrupt, match="re-open"):
        ledger.commit(dp_sgd(), round=1)
    assert ledger.epsilon() == eps
    ledger.close()
    # The bytes did reach the file (only fsync failed): re-opening counts them — over-count, never under.
    with open_ledger(path, key) as again:
        assert again.epsilon() > eps


def test_budget_exceeded_writes_nothing(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "h1.jsonl"
    with open_ledger(path, key, max_epsilon=3.0) as ledger:
        big = dp_sgd(steps=2000)
        assert ledger.would_exceed(big)
        before = path.read_bytes()
        with pytest.raises(BudgetExceeded) as info:
            ledger.commit(big, round=0)
        assert path.read_bytes() == before and ledger.events == ()
        err = info.value
        assert (err.participant, err.unit, err.budget, err.delta) == ("h1", "record", 3.0, DELTA)
        assert err.epsilon_would_be > 3.0 and "3" in str(err)
        small = dp_sgd(steps=50)
        assert not ledger.would_exceed(small)
        assert ledger.epsilon_if(small) == ledger.commit(small, round=0)["epsilon_after"]


def test_each_unit_has_its_own_budget(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    with open_ledger(tmp_path / "h1.jsonl", key, unit_budgets={"participant": 1.0}) as ledger:
        ledger.commit(dp_sgd(), round=0)
        record_eps = ledger.epsilon("record")
        assert ledger.budget("record") == 8.0 and ledger.budget("participant") == 1.0
        with pytest.raises(BudgetExceeded, match="participant-level"):
            ledger.commit(logits_event(sigma=1.0), round=0)
        entry = ledger.commit(logits_event(sigma=8.0), round=0)
        assert set(entry["epsilon_by_unit"]) == {"record", "participant"}
        assert ledger.epsilon("record") == record_eps  # the other unit's spend does not leak in
        assert ledger.epsilon() == max(record_eps, ledger.epsilon("participant"))
        assert ledger.remaining("participant") == pytest.approx(1.0 - ledger.epsilon("participant"))
        assert ledger.remaining() == min(ledger.remaining("record"), ledger.remaining("participant"))


def test_public_data_step_is_logged_and_free(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    with open_ledger(tmp_path / "h1.jsonl", key) as ledger:
        ledger.commit(dp_sgd(), round=0)
        eps = ledger.epsilon()
        assert not ledger.would_exceed(PublicDataEvent(payload="public_logits"))
        entry = ledger.commit(PublicDataEvent(payload="public_logits", reason="FedMD public set"), round=1)
        assert entry["mechanism"] == "none" and entry["noise_multiplier"] is None
        assert entry["epsilon_after"] == eps and entry["note"] == "FedMD public set"
        assert ledger.epsilon() == eps and isinstance(ledger.events[-1], PublicDataEvent)


def test_resume_continues_the_same_chain_and_spend(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "h1.jsonl"
    with open_ledger(path, key) as ledger:
        ledger.commit(dp_sgd(), round=0)
        ledger.commit(PublicDataEvent(payload="public_logits"), round=0)
        ledger.seal(key)
        eps, events, head = ledger.epsilon(), ledger.events, ledger.head
    with open_ledger(path, key) as ledger:
        assert ledger.epsilon() == eps and ledger.events == events and ledger.head == head and ledger.sealed
        entry = ledger.commit(dp_sgd(), round=1)
        assert entry["prev_hash"] == head and not ledger.sealed
        seal = ledger.seal(key)
        assert seal["head"] == entry["hash"] and ledger.sealed
        assert ledger.seal(key) == seal  # nothing new to seal
    contents = read_ledger(path)
    assert [e["kind"] for e in contents.entries] == ["header", "release", "release", "seal", "release", "seal"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_epsilon", 10.0),
        ("delta", 1e-6),
        ("accountant", "pld"),
        ("participant", "h2"),
        ("unit_budgets", {"participant": 1.0}),
    ],
)
def test_resume_with_other_parameters_is_refused(tmp_path: Path, key: Ed25519PrivateKey, field: str, value) -> None:
    path = tmp_path / "h1.jsonl"
    open_ledger(path, key).close()
    with pytest.raises(LedgerMismatch, match=field):
        open_ledger(path, key, **{field: value})


def test_resume_with_another_key_is_refused(tmp_path: Path, key: Ed25519PrivateKey, other_key) -> None:
    path = tmp_path / "h1.jsonl"
    open_ledger(path, key).close()
    with pytest.raises(LedgerMismatch, match="signing_key"):
        open_ledger(path, other_key)


def test_seal_with_another_key_is_refused(tmp_path: Path, key: Ed25519PrivateKey, other_key) -> None:
    with open_ledger(tmp_path / "h1.jsonl", key) as ledger:
        with pytest.raises(LedgerMismatch, match="signing_key"):
            ledger.seal(other_key)
        assert not ledger.sealed


def test_one_open_ledger_per_file(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "h1.jsonl"
    first = open_ledger(path, key)
    with pytest.raises(LedgerLocked, match="already open"):
        open_ledger(path, key)
    first.close()
    open_ledger(path, key).close()
    with pytest.raises(ValueError, match="closed"):
        first.commit(dp_sgd(), round=0)


def test_unsupported_event_writes_nothing(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "h1.jsonl"
    replace_sgd = dp_sgd().model_copy(update={"relation": "replace_one", "sensitivity": 2.0})
    with open_ledger(path, key) as ledger:
        before = path.read_bytes()
        with pytest.raises(UnsupportedEvent, match="replace_one"):
            ledger.would_exceed(replace_sgd)
        with pytest.raises(UnsupportedEvent, match="replace_one"):
            ledger.commit(replace_sgd, round=0)
        ledger.commit(logits_event(), round=0)
        with pytest.raises(UnsupportedEvent, match="relations"):
            ledger.commit(logits_event().model_copy(update={"relation": "add_remove", "sensitivity": 1.0}), round=0)
        assert len(path.read_bytes().splitlines()) == len(before.splitlines()) + 1
    with open_ledger(tmp_path / "h2.jsonl", key, accountant="pld", participant="h2") as pld_ledger:
        assert pld_ledger.commit(replace_sgd, round=0)["relation"] == "replace_one"


def test_commit_argument_checks(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    with open_ledger(tmp_path / "h1.jsonl", key) as ledger:
        with pytest.raises(ValueError, match="round"):
            ledger.commit(dp_sgd(), round=-1)
        with pytest.raises(ValueError, match="round"):
            ledger.commit(dp_sgd(), round=True)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="payload 'logits' does not match"):
            ledger.commit(dp_sgd(), round=0, payload="logits")
        with pytest.raises(TypeError, match="PrivacyEvent"):
            ledger.commit({"noise_multiplier": 1.0}, round=0)  # type: ignore[arg-type]
        assert ledger.events == ()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(participant=""), "participant"),
        (dict(max_epsilon=0.0), "max_epsilon"),
        (dict(max_epsilon=float("inf")), "max_epsilon"),
        (dict(delta=0.0), "delta"),
        (dict(accountant="gdp"), "unknown accountant 'gdp'"),
        (dict(unit_budgets={"patient": 1.0}), "unit_budgets"),
        (dict(unit_budgets={"record": -1.0}), "unit_budgets"),
    ],
)
def test_open_argument_checks(tmp_path: Path, key: Ed25519PrivateKey, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        open_ledger(tmp_path / "h1.jsonl", key, **kwargs)
    assert not (tmp_path / "h1.jsonl").exists()


def test_signing_key_type_checked(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="signing_key"):
        Ledger.open(tmp_path / "h1.jsonl", participant="h1", max_epsilon=1.0, delta=DELTA, signing_key="secret")  # type: ignore[arg-type]


def test_raw_key_bytes_accepted(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "h1.jsonl", participant="h1", max_epsilon=1.0, delta=DELTA, signing_key=b"k" * 32) as lg:
        lg.seal(b"k" * 32)
        assert read_ledger(lg.path).sealed


def test_empty_file_is_refused_not_restarted(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "h1.jsonl"
    path.write_bytes(b"")
    with pytest.raises(LedgerCorrupt, match="line 1"):
        open_ledger(path, key)
    assert path.read_bytes() == b""


def test_direct_construction_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="Ledger.open"):
        Ledger(_token=None, path=tmp_path, fd=0, contents=None)  # type: ignore[arg-type]


def test_pld_ledger_reports_pld(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    with open_ledger(tmp_path / "h1.jsonl", key, accountant="pld") as ledger:
        entry = ledger.commit(PrivacyEvent.dp_sgd(noise_multiplier=2.0, sample_rate=0.05, steps=100), round=0)
        assert entry["accountant"] == "pld" and ledger.accountant_name == "pld"
        assert entry["epsilon_after"] < get_accountant("rdp").epsilon(ledger.events, delta=DELTA)


def test_spend_history_for_reports(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "h1.jsonl"
    with open_ledger(path, key) as ledger:
        for r in range(3):
            ledger.commit(dp_sgd(), round=r)
        ledger.commit(PublicDataEvent(payload="public_logits"), round=3)
        ledger.seal(key)
    history = read_ledger(path).spend_history()
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    eps = [h["epsilon_after"] for h in history]
    assert eps[0] < eps[1] < eps[2] == eps[3] and history[3]["mechanism"] == "none"


def test_relation_of_each_unit(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    with open_ledger(tmp_path / "h1.jsonl", key) as ledger:
        assert ledger.relation("record") is None
        ledger.commit(dp_sgd(), round=0)
        ledger.commit(logits_event(), round=0)
        assert (ledger.relation("record"), ledger.relation("participant")) == ("add_remove", "replace_one")
