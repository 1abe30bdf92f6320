"""The command line: bad input is one line and exit code 2; runs resume after a real kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from securefl.cli import main
from tests.conftest import metrics_without_time, tiny_raw

# (name, raw config or text, the field the one-line error must name)
BAD_CONFIGS: list[tuple[str, Any, str]] = [
    ("unknown top-level key", tiny_raw(rounds=3), "rounds"),
    ("unknown protocol", tiny_raw(protocol="fedprox"), "protocol"),
    ("unknown model", tiny_raw(participants=[{"id": "a", "model": "vgg99"}]), "participants.0.model"),
    ("negative rounds", tiny_raw(run={"rounds": -1}), "run.rounds"),
    ("rounds not a number", tiny_raw(run={"rounds": "many"}), "run.rounds"),
    ("participation above 1", tiny_raw(run={"participation": 1.5}), "run.participation"),
    ("unknown dataset", tiny_raw(data={"dataset": "imagenet"}), "data.dataset"),
    ("alpha zero", tiny_raw(data={"partition": {"kind": "dirichlet", "alpha": 0}}), "data.partition.alpha"),
    ("unknown partition kind", tiny_raw(data={"partition": {"kind": "random"}}), "data.partition"),
    ("typo in fedmd section", tiny_raw(fedmd={"alignment_sizes": 10}), "fedmd.alignment_sizes"),
    ("bad digest loss", tiny_raw(fedmd={"digest_loss": "l3"}), "fedmd.digest_loss"),
    ("zero batch size", tiny_raw(training={"batch_size": 0}), "training.batch_size"),
    ("unknown optimizer", tiny_raw(training={"optimizer": "lbfgs"}), "training.optimizer"),
    ("negative lr", tiny_raw(training={"lr": -0.1}), "training.lr"),
    ("no participants", tiny_raw(participants=[]), "participants"),
    ("duplicate ids", tiny_raw(participants=[{"id": "a", "model": "mlp_s"}, {"id": "a", "model": "mlp_s"}]),
     "participants"),
    ("id with a slash", tiny_raw(participants=[{"id": "../etc", "model": "mlp_s"}]), "participants.0.id"),
    ("participant missing model", tiny_raw(participants=[{"id": "a"}]), "participants.0.model"),
    ("val_fraction 1", tiny_raw(data={"val_fraction": 1.0}), "data.val_fraction"),
    ("explicit assignment count", {**tiny_raw(), "data": {"partition": {"kind": "explicit", "assignment": [[1, 2]]}}},
     "assignment"),
    ("public size negative", tiny_raw(data={"public_size": -5}), "data.public_size"),
    ("not a mapping", "- just\n- a list\n", "top level"),
    ("invalid yaml", "protocol: [fedmd\n", "not valid YAML"),
    ("empty file", "", "empty"),
    ("missing protocol", {k: v for k, v in tiny_raw().items() if k != "protocol"}, "protocol"),
]


@pytest.mark.parametrize(("name", "raw", "field"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_malformed_config_exits_2_with_one_line_naming_the_field(name: str, raw: Any, field: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert field in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_missing_data_dir_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tmp_path, tiny_raw(data={"dataset": "fashion_mnist"}))
    code = main(["run", str(cfg), "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "nowhere"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "nowhere" in err and "apt-get install dataset-fashion-mnist" in err


def test_set_override_and_refusing_to_overwrite_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tmp_path, tiny_raw())
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--set", "run.rounds=1", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and {"id", "model", "final_accuracy"} <= set(summary["participants"][0])
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # Resuming with a different config is refused too.
    assert main(["run", str(cfg), "--out", str(out), "--resume", "--quiet"]) == 2
    assert "differs" in capsys.readouterr().err


def test_fedavg_with_mixed_models_is_refused_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tmp_path, tiny_raw(protocol="fedavg"))
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "same model" in capsys.readouterr().err


def test_corrupt_checkpoint_is_reported_not_silently_restarted(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tmp_path, tiny_raw(run={"rounds": 1}))
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    (out / "checkpoints" / "last.pt").write_bytes(b"garbage")
    assert main(["run", str(cfg), "--out", str(out), "--resume", "--quiet"]) == 2
    assert "last.pt" in capsys.readouterr().err


def test_protocols_lists_every_registered_protocol(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["protocols"]) == 0
    out = capsys.readouterr().out
    for name in ("fedmd", "local_only", "pooled", "fedavg"):
        assert name in out


def test_killed_process_resumes_to_the_same_metrics(tmp_path: Path) -> None:
    """SIGKILL a real run once round 2's checkpoint exists, resume it, compare with an uninterrupted run."""
    cfg = _write(tmp_path, tiny_raw(run={"rounds": 5}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "securefl.cli", "run", str(cfg), "--quiet"]
    subprocess.run([*cmd, "--out", str(tmp_path / "full")], check=True, env=env, timeout=300)

    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "cut")], env=env)
    checkpoint = tmp_path / "cut" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if checkpoint.exists():
                try:
                    if torch.load(checkpoint, weights_only=False)["round"] >= 2:
                        break
                except Exception:  # noqa: BLE001 - being replaced at this instant; poll again
                    pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "cut" / "summary.json").exists()
    subprocess.run([*cmd, "--out", str(tmp_path / "cut"), "--resume"], check=True, env=env, timeout=300)
    assert metrics_without_time(tmp_path / "cut") == metrics_without_time(tmp_path / "full")


def test_threads_sets_torchs_thread_count_and_refuses_nonsense(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tmp_path, tiny_raw())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--set", "run.rounds=1", "--quiet",
                     "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    for bad in ("0", "two", "-1"):
        with pytest.raises(SystemExit) as exit_info:
            main(["run", str(cfg), "--out", str(tmp_path / "other"), "--threads", bad])
        assert exit_info.value.code == 2 and f"--threads: must be a whole number >= 1, got '{bad}'" in capsys.readouterr().err


def test_a_reader_that_goes_away_is_not_a_traceback(tmp_path: Path) -> None:
    """`securefl protocols | head -1`: the pipe closes early; the command stops quietly."""
    shell = subprocess.run(f"{sys.executable} -m securefl.cli protocols | head -c 1", shell=True,
                           capture_output=True, text=True, timeout=120)
    assert "Traceback" not in shell.stderr and "BrokenPipe" not in shell.stderr


def test_key_ceremony_steps_refuse_bad_input_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "plain.yaml"
    config.write_text(yaml.safe_dump(tiny_raw()))  # no secure aggregation: there is no committee
    key_dir = str(tmp_path / "p0" / "keys")
    assert main(["keys", "list", "--key-dir", key_dir]) == 2
    assert "no roster" in capsys.readouterr().err
    assert main(["keys", "create", "p0", "--key-dir", key_dir]) == 0
    out = capsys.readouterr().out
    assert "p0.card" in out and "fingerprint" in out
    assert main(["keys", "list", "--key-dir", key_dir]) == 0
    assert "this party" in capsys.readouterr().out
    assert main(["keys", "trust", str(tmp_path / "nowhere.card"), "--key-dir", key_dir, "--fingerprint", "0000"]) == 2
    assert "nowhere.card: cannot read" in capsys.readouterr().err
    other = tmp_path / "p1" / "keys"
    assert main(["keys", "create", "p1", "--key-dir", str(other)]) == 0
    heard = out.rsplit("fingerprint: ", 1)[1].strip()  # p0's, as its owner would read it out
    assert main(["keys", "trust", key_dir + "/p0.card", "--key-dir", str(other)]) == 2  # no fingerprint: refused
    err = capsys.readouterr().err
    assert "--fingerprint: required for every card" in err and "Traceback" not in err
    assert main(["keys", "trust", key_dir + "/p0.card", key_dir + "/p0.card", "--key-dir", str(other),
                 "--fingerprint", heard]) == 2
    assert "2 cards but 1 fingerprints" in capsys.readouterr().err
    assert main(["keys", "trust", key_dir + "/p0.card", "--key-dir", str(other), "--fingerprint", "0000"]) == 2
    assert "not the '0000' its owner read out" in capsys.readouterr().err
    assert not (other / "roster" / "p0.pub").exists()
    assert main(["keys", "trust", key_dir + "/p0.card", "--key-dir", str(other), "--fingerprint", heard.upper()]) == 0
    assert "matches the one read out" in capsys.readouterr().out
    assert main(["keys", "committee-create", str(config), "--id", "p0", "--key-dir", key_dir, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "secure_aggregation='none'" in err and "Traceback" not in err


def test_a_simulations_keys_live_outside_its_run_directory_and_the_audit_pins_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`securefl run --keys DIR`: the owners' private keys go to DIR/<run id>/, never into the run directory;
    `securefl audit` pins every ledger to DIR's roster, and without it says UNPINNED and fails."""
    raw = tiny_raw(privacy={"unit": "participant", "target_epsilon": 8.0},
                   participants=[{"id": "p0", "model": "mlp_s"}, {"id": "p1", "model": "mlp_s"}], run={"rounds": 1})
    cfg, run, keys = _write(tmp_path, raw), tmp_path / "run", tmp_path / "officer-keys"
    assert main(["run", str(cfg), "--out", str(run), "--quiet", "--keys", str(keys)]) == 0
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    assert sorted(p.name for p in (keys / run_id).glob("*.ed25519")) == ["aggregator.ed25519", "p0.ed25519",
                                                                          "p1.ed25519"]
    assert list(run.rglob("*.ed25519")) == [] and (run / "releases.jsonl").read_text()
    capsys.readouterr()
    assert main(["audit", str(run), "--keys", str(keys)]) == 0
    assert "pinned to the key store" in capsys.readouterr().out
    assert main(["audit", str(run)]) == 1  # $SECUREFL_KEYS is another store: nothing vouches for the keys
    out = capsys.readouterr().out
    assert "WARNING: UNPINNED ledger key(s) of p0, p1" in out and "result: FAILED" in out
    assert main(["audit", str(run), "--allow-unpinned"]) == 0
    assert "result: OK, but UNPINNED" in capsys.readouterr().out
    # --keys outside the run directory only: a key store inside it would hand the keys to every reader.
    assert main(["run", str(cfg), "--out", str(tmp_path / "other"), "--quiet", "--keys",
                 str(tmp_path / "other" / "keys")]) == 2
    assert "must live outside the run directory" in capsys.readouterr().err
