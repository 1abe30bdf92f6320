"""A real Flower deployment on loopback: one SuperLink and three SuperNodes as separate OS processes.

Each SuperNode hosts one data owner with its own directory (keys, ledger, checkpoints) and runs private
FedMD with CKKS; the coordinator runs as Flower's ServerApp. The test checks that every node's ledger passes
``securefl audit``, that the coordinator never held a participant's key, and that the accuracies equal the
in-process simulation of the same config and seed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower extra is not installed (pip install 'securefl[flower]')")

from securefl.config import load_config  # noqa: E402
from securefl.deploy.provision import provision  # noqa: E402
from securefl.runtime.federation import Federation  # noqa: E402

pytestmark = pytest.mark.integration

APP = Path(__file__).resolve().parents[2] / "securefl" / "deploy" / "flower_app"
BIN = Path(sys.executable).parent
CONFIG = """
protocol: fedmd
run: {seed: 0, rounds: 2, name: flower-loopback}
data:
  dataset: digits
  partition: {kind: dirichlet, alpha: 0.5}
  public_size: 200
  val_fraction: 0.15
training: {optimizer: sgd, lr: 0.1, momentum: 0.9, batch_size: 32, local_epochs: 1}
privacy: {unit: record, delta: 1.0e-5, accountant: rdp, max_grad_norm: 1.0}
secure_aggregation: ckks
participants:
  - {id: site_a, model: mlp_s, target_epsilon: 4}
  - {id: site_b, model: cnn_s, target_epsilon: 8}
  - {id: site_c, model: mlp_m, policy_file: POLICY}
fedmd: {alignment_size: 200, transfer_max_epochs: 2, revisit_epochs: 1, revisit_batch_size: 32}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"port {port} not open after {timeout} s: {log.read_text()[-2000:]}")


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:  # bounded shutdown: SIGTERM the group, then SIGKILL after 10 s
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def spawn(cmd: list[str], log: Path, env: dict[str, str], started: list[subprocess.Popen]) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    started.append(proc)
    return proc


def test_private_fedmd_with_ckks_on_a_loopback_flower_deployment(tmp_path: Path, processes) -> None:
    policy = tmp_path / "site_c_policy.yaml"
    policy.write_text("max_epsilon: 2.0\ndelta: 1.0e-5\nunit: record\n")
    config_path = tmp_path / "experiment.yaml"
    config_path.write_text(CONFIG.replace("POLICY", str(policy)))
    config = load_config(config_path)
    nodes = {p.id: tmp_path / "nodes" / p.id for p in config.participants}
    coordinator = tmp_path / "coordinator"
    provision(config, coordinator_dir=coordinator, node_dirs=nodes)

    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr_home"), "PATH": f"{BIN}:{os.environ['PATH']}"}
    link_port = free_port()
    (tmp_path / "flwr_home").mkdir()
    (tmp_path / "flwr_home" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    link = spawn([str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                  "--port", str(link_port)], tmp_path / "superlink.log", env, processes)
    wait_for_port(link_port, link, tmp_path / "superlink.log")
    for pid, node_dir in nodes.items():
        # Each owner's node: its directory, and (site_c) its own policy file, which the coordinator cannot override.
        node_config = f'participant-id="{pid}" node-dir="{node_dir}"'
        if pid == "site_c":
            node_config += f' policy-file="{policy}"'
        port = free_port()
        node = spawn([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                      "--port", str(port), "--node-config", node_config], tmp_path / f"{pid}.log", env, processes)
        wait_for_port(port, node, tmp_path / f"{pid}.log")

    run = subprocess.run([str(BIN / "flwr"), "run", str(APP), "loopback", "--stream", "--run-config",
                          f'config="{config_path}" out="{coordinator}" timeout=120.0 wait-for-nodes=60.0'],
                         env=env, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    deadline = time.monotonic() + 120
    while not (coordinator / "summary.json").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (coordinator / "summary.json").exists(), (tmp_path / "superlink.log").read_text()[-3000:]
    deployed = json.loads((coordinator / "summary.json").read_text())
    rejected = [r for line in (coordinator / "metrics.jsonl").read_text().splitlines() for r in json.loads(line)["rejected"]]
    assert rejected == []

    # Every node's ledger verifies, and the state stayed on the nodes: the coordinator holds no ledger and
    # only the aggregator's key and the CKKS public context.
    for node_dir in nodes.values():
        audit = subprocess.run([str(BIN / "securefl"), "audit", str(node_dir), "--json"], capture_output=True, text=True)
        assert audit.returncode == 0, audit.stdout + audit.stderr
        assert json.loads(audit.stdout)["ok"] is True
    assert not (coordinator / "ledgers").exists()
    coordinator_keys = sorted(p.name for p in (coordinator / "keys").iterdir() if p.is_file())
    assert coordinator_keys == ["aggregator.ed25519", "ckks_public.context"]
    by_id = {p["id"]: p for p in deployed["participants"]}
    # site_c's owner allows ε = 2; the experiment asked for nothing stricter, so its policy binds.
    assert by_id["site_c"]["target_epsilon"] == 2.0 and 0 < by_id["site_c"]["epsilon"] <= 2.0

    simulated = Federation(config, tmp_path / "simulation", progress=False).run()
    for mine, theirs in zip(deployed["participants"], simulated["participants"], strict=True):
        assert mine["id"] == theirs["id"]
        assert abs(mine["final_accuracy"] - theirs["final_accuracy"]) <= 0.02, (mine, theirs)
        assert mine["epsilon"] == pytest.approx(theirs["epsilon"], rel=1e-9)
