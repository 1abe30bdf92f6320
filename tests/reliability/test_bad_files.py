"""Bad files: corrupt or truncated checkpoints, ledgers, policy, key and data files are each refused with
one line naming the file (exit code 2), and a run never silently starts over and loses its ledger.

Already covered elsewhere, not repeated here: a checkpoint of garbage bytes (tests/test_cli.py), every
kind of ledger tampering against ``Ledger.open`` and the audit (tests/privacy/test_tamper.py), an empty
ledger file (tests/privacy/test_ledger.py), policy files with bad YAML/JSON/fields
(tests/privacy/test_budget.py) and IDX files with a bad header or length (tests/data/test_datasets.py).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from securefl.cli import main
from securefl.config import parse_config
from securefl.privacy.audit import audit_run
from securefl.runtime.checkpoint import RunDirError, lock_run_dir
from securefl.runtime.federation import Federation
from tests.conftest import Crash, crash_after_round, tiny_raw
from tests.data.test_datasets import _write_idx
from tests.reliability.helpers import small_raw


def _raw(**changes: Any) -> dict[str, Any]:
    base = {"participants": [{"id": f"p{i}", "model": "mlp_s", "target_epsilon": 4.0} for i in range(3)],
            "fedmd": {"alignment_size": 60, "transfer_max_epochs": 2, "revisit_epochs": 1},
            "privacy": {"unit": "participant", "clip_norm": 5.0}, "run": {"rounds": 2}}
    return small_raw(base, changes)


def _cut_run(root: Path, raw: dict[str, Any]) -> tuple[Path, Path]:
    """A run killed after round 1's checkpoint (ledgers open, unsealed), and its config file."""
    from securefl.config import parse_config

    cfg_path = root / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))

    def crash(rnd: int) -> None:
        raise Crash

    with pytest.raises(Crash):
        Federation(parse_config(raw), root / "run", progress=False, on_round_end=crash).run()
    return root / "run", cfg_path


@pytest.fixture(scope="module")
def cut(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _cut_run(tmp_path_factory.mktemp("cut"), _raw())


@pytest.fixture
def run(cut: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A private copy of the cut run, with its config file and its owners' keys (kept outside the run)."""
    shutil.copytree(cut[0], tmp_path / "run")
    shutil.copy(cut[1], tmp_path / "cfg.yaml")
    run_id = json.loads((cut[0] / "run.json").read_text())["run_id"]
    shutil.copytree(Path(os.environ["SECUREFL_KEYS"]) / run_id, tmp_path / "keys" / run_id)
    monkeypatch.setenv("SECUREFL_KEYS", str(tmp_path / "keys"))
    return tmp_path / "run", tmp_path / "cfg.yaml"


def _key_dir(run_dir: Path) -> Path:
    """Where the simulation keeps this run's private keys: the key store, outside the run directory."""
    return Path(os.environ["SECUREFL_KEYS"]) / json.loads((run_dir / "run.json").read_text())["run_id"]


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _resume(run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["run", str(run[1]), "--out", str(run[0]), "--resume", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return code, err


def _fails_cleanly(code: int, err: str, *needles: str) -> None:
    assert code == 2 and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


# ----- checkpoints ----------------------------------------------------------------------------------
def test_a_truncated_checkpoint_is_named_and_the_run_is_left_as_it_was(run: tuple[Path, Path],
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = run[0] / "checkpoints" / "last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    before = _snapshot(run[0])
    _fails_cleanly(*_resume(run, capsys), "checkpoints/last.pt", "corrupt or truncated", "refusing to start over")
    assert _snapshot(run[0]) == before  # ledgers, metrics and keys untouched


def test_a_run_killed_before_its_first_checkpoint_is_named_not_reported_as_a_forged_ledger(
        run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Killed during set-up: ledgers opened, no checkpoint, no metrics. Starting again in that directory used to
    fail deep in set-up with "another participant's key or a rewritten ledger"; it must say what happened."""
    (run[0] / "checkpoints" / "last.pt").unlink()
    (run[0] / "metrics.jsonl").unlink()
    before = _snapshot(run[0])
    code = main(["run", str(run[1]), "--out", str(run[0]), "--quiet"])
    _fails_cleanly(code, capsys.readouterr().err.strip(), "stopped before its first checkpoint",
                   "nothing to resume", "never overwrites a ledger")
    assert _snapshot(run[0]) == before


def test_a_deleted_checkpoint_neither_restarts_nor_resumes(run: tuple[Path, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    (run[0] / "checkpoints" / "last.pt").unlink()
    before = _snapshot(run[0])
    _fails_cleanly(*_resume(run, capsys), "no checkpoint")
    code = main(["run", str(run[1]), "--out", str(run[0]), "--quiet"])
    _fails_cleanly(code, capsys.readouterr().err.strip(), "already holds a run", "never overwrites")
    assert _snapshot(run[0]) == before


# ----- ledgers --------------------------------------------------------------------------------------
def _truncate_mid_line(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-25])


def _flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    line2 = raw.index(b"\n") + 1
    at = raw.index(b'"noise_multiplier":', line2) + len('"noise_multiplier":')
    raw[at] = ord("9") if raw[at] != ord("9") else ord("8")
    path.write_bytes(bytes(raw))


def _drop_last_release(path: Path) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))  # a valid chain, one release shorter: rolled back


def _empty(path: Path) -> None:
    path.write_bytes(b"")


LEDGER_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate_mid_line, "last line is incomplete"),
    "flipped-byte": (_flip_a_byte, "p1.jsonl, line 2: "),
    "emptied": (_empty, "empty file"),
}


@pytest.mark.parametrize("damage", list(LEDGER_DAMAGE))
def test_a_damaged_ledger_stops_the_resume_naming_it(damage: str, run: tuple[Path, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    corrupt, needle = LEDGER_DAMAGE[damage]
    corrupt(run[0] / "ledgers" / "p1.jsonl")
    before = _snapshot(run[0])
    _fails_cleanly(*_resume(run, capsys), "ledgers/p1.jsonl", needle)
    assert _snapshot(run[0]) == before  # nothing rewritten, nothing restarted


def test_a_ledger_rolled_back_to_a_line_boundary_stops_the_resume(run: tuple[Path, Path],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A ledger cut exactly at a line boundary is a valid, shorter chain; the checkpoint's record of its
    length and head tells it from a shorter run."""
    _drop_last_release(run[0] / "ledgers" / "p1.jsonl")
    before = _snapshot(run[0])
    _fails_cleanly(*_resume(run, capsys), "ledgers/p1.jsonl", "rolled back or replaced")
    assert _snapshot(run[0]) == before


def test_a_deleted_ledger_is_never_recreated_at_zero(run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    ledger = run[0] / "ledgers" / "p1.jsonl"
    ledger.unlink()
    before = _snapshot(run[0])
    _fails_cleanly(*_resume(run, capsys), "ledgers/p1.jsonl", "ledger file is missing", "restart at 0")
    assert not ledger.exists() and _snapshot(run[0]) == before
    rows = [r for r in audit_run(run[0]).rows if r.participant == "p1"]
    assert [(r.status, r.reasons[0][:23]) for r in rows] == [("tampered", "ledger file is missing:")]


# ----- policy files -----------------------------------------------------------------------------------
POLICIES: dict[str, tuple[bytes | None, str]] = {
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a UTF-8 text file"),
    "truncated": (b"participant: p1\nmax_epsilon: 2.0\ndelta: 1.0e-", "field 'delta'"),
    "cut-mid-key": (b"participant: p1\nmax_eps", "not valid YAML at line 2, column 8: could not find expected ':'"),
    "missing": (None, "privacy policy file not found"),
}


@pytest.mark.parametrize("name", list(POLICIES))
def test_a_bad_policy_file_is_named_before_anything_runs(name: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    content, needle = POLICIES[name]
    policy = tmp_path / "p1_policy.yaml"
    if content is not None:
        policy.write_bytes(content)
    raw = _raw()
    raw["participants"][1] = {"id": "p1", "model": "mlp_s", "policy_file": str(policy)}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    code = main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"])
    _fails_cleanly(code, capsys.readouterr().err.strip(), str(policy), needle)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_policy_changed_mid_run_cannot_reset_or_rewrite_the_ledger(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p1_policy.yaml"
    policy.write_text("participant: p1\nmax_epsilon: 3.0\ndelta: 1.0e-5\nunit: participant\n")
    raw = _raw()
    raw["participants"][1] = {"id": "p1", "model": "mlp_s", "policy_file": str(policy)}
    run_dir, cfg = _cut_run(tmp_path, raw)
    policy.write_text("participant: p1\nmax_epsilon: 1.0\ndelta: 1.0e-5\nunit: participant\n")
    before = _snapshot(run_dir)
    _fails_cleanly(*_resume((run_dir, cfg), capsys), "ledgers/p1.jsonl", "max_epsilon", "cannot change mid-run")
    assert _snapshot(run_dir) == before


# ----- key files ----------------------------------------------------------------------------------------
def test_a_corrupt_signing_key_file_is_named(run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    key = _key_dir(run[0]) / "p1.ed25519"
    key.write_bytes(key.read_bytes()[:40])
    _fails_cleanly(*_resume(run, capsys), str(key), "not a readable Ed25519 private key")


def test_a_resume_without_the_key_store_is_refused(run: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh keys could not extend the sealed ledgers: a resume that cannot find the run's keys names where it
    looked, and changes nothing."""
    monkeypatch.setenv("SECUREFL_KEYS", str(tmp_path / "elsewhere"))
    before = _snapshot(run[0])
    _fails_cleanly(*_resume(run, capsys), str(tmp_path / "elsewhere"), "keys of run", "SECUREFL_KEYS")
    assert _snapshot(run[0]) == before and not (tmp_path / "elsewhere").exists()


def test_a_corrupt_ckks_committee_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, cfg = _cut_run(tmp_path, _raw(secure_aggregation="ckks"))
    secret = _key_dir(run_dir) / "ckks_committee.secret"
    secret.write_bytes(secret.read_bytes()[:100])
    before = _snapshot(run_dir)
    _fails_cleanly(*_resume((run_dir, cfg), capsys), str(secret), "corrupt or unreadable")
    assert _snapshot(run_dir) == before


# ----- data files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("damage", "needle"),
    [("truncated-gzip", "train-images-idx3-ubyte.gz: cannot read IDX file"),
     ("not-gzip", "train-images-idx3-ubyte.gz: cannot read IDX file"),
     ("short-body", "train-images-idx3-ubyte.gz: expected 31360 data bytes")],
)
def test_a_corrupt_dataset_file_is_named(damage: str, needle: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "fmnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    _write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (40, 28, 28)))
    _write_idx(root / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 40))
    _write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (5, 28, 28)))
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 5))
    images = root / "train-images-idx3-ubyte.gz"
    if damage == "truncated-gzip":
        images.write_bytes(images.read_bytes()[:-30])
    elif damage == "not-gzip":
        images.write_bytes(b"<html>404 Not Found</html>")
    elif damage == "short-body":
        with gzip.open(images, "rb") as handle:
            raw = handle.read()
        with gzip.open(images, "wb") as handle:
            handle.write(raw[:-100])
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw(data={"dataset": "fashion_mnist", "public_size": 0})))
    code = main(["run", str(cfg), "--out", str(tmp_path / "run"), "--data-dir", str(root), "--quiet"])
    _fails_cleanly(code, capsys.readouterr().err.strip(), needle)


def test_the_undamaged_cut_run_resumes_and_a_deleted_ledger_fails_its_audit(run: tuple[Path, Path],
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # The refusals above are specific: the same cut run, undamaged, resumes and passes the audit...
    code, err = _resume(run, capsys)
    assert code == 0, err
    assert json.loads((run[0] / "summary.json").read_text())["rounds"] == 2
    assert main(["audit", str(run[0])]) == 0
    # ...and once finished, deleting a participant's ledger is the one thing that makes it fail.
    (run[0] / "ledgers" / "p2.jsonl").unlink()
    capsys.readouterr()
    assert main(["audit", str(run[0])]) == 1
    assert "ledger file is missing" in capsys.readouterr().out
    assert {(r.participant, r.status) for r in audit_run(run[0]).rows} == {("p0", "ok"), ("p1", "ok"), ("p2", "tampered")}


# ----- the run's own records ----------------------------------------------------------------------
RUN_FILES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "corrupt run.json": (lambda run: (run / "run.json").write_text("{not json"), "run.json", "unreadable or corrupt"),
    "metrics cut short": (lambda run: (run / "metrics.jsonl").write_text(""), "metrics.jsonl", "cut short"),
    "metrics corrupt": (lambda run: (run / "metrics.jsonl").write_text("{\n" * 3), "metrics.jsonl, line 1", "not JSON"),
}


@pytest.mark.parametrize("name", list(RUN_FILES))
def test_a_damaged_run_record_is_named_and_the_run_left_as_it_was(name: str, run: tuple[Path, Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    damage, where, why = RUN_FILES[name]
    damage(run[0])
    before = _snapshot(run[0])
    _fails_cleanly(*_resume(run, capsys), where, why)
    assert _snapshot(run[0]) == before


def test_a_checkpoint_of_another_run_is_refused(run: tuple[Path, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    checkpoint = run[0] / "checkpoints" / "last.pt"
    state = torch.load(checkpoint, weights_only=False)
    torch.save({**state, "run_id": "someone-else"}, checkpoint)
    _fails_cleanly(*_resume(run, capsys), "checkpoints/last.pt", "not a checkpoint of run", "someone-else")


def test_a_run_directory_in_use_by_another_process_is_refused_and_freed_when_that_process_dies(
        tmp_path: Path) -> None:
    """A run without DP has no ledger lock: only the run directory's lock stops a second `--resume` from
    interleaving its metrics and checkpoints with the first. The OS frees it when its holder dies, so a
    killed run can be resumed at once."""
    cfg, out = parse_config(tiny_raw(run={"rounds": 2})), tmp_path / "run"
    with pytest.raises(Crash):
        Federation(cfg, out, progress=False, on_round_end=crash_after_round(1)).run()
    first = Federation(cfg, out, progress=False, resume=True)
    with pytest.raises(RunDirError, match=rf"{out} is in use by another process \(pid {os.getpid()}\)"):
        Federation(cfg, out, progress=False, resume=True)
    first.run()
    os.close(lock_run_dir(out))  # freed once the run is over

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from securefl.runtime.checkpoint import lock_run_dir\n"
                               "lock_run_dir(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=rf"in use by another process \(pid {holder.pid}\)"):
            lock_run_dir(out)
    finally:
        holder.send_signal(signal.SIGKILL)  # also when an assertion failed: never leave it sleeping
        holder.wait(timeout=30)
    os.close(lock_run_dir(out))
