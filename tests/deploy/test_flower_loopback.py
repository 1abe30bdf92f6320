"""A real Flower deployment on loopback: one SuperLink and three SuperNodes as separate OS processes.

Each SuperNode hosts one data owner with its own directory (keys, ledger, checkpoints) and runs private
FedMD with CKKS, or private FML with pairwise masking; the coordinator runs as Flower's ServerApp. The tests
check that every node's ledger passes ``securefl audit``, that the coordinator never held a participant's
key, and that the accuracies equal the in-process simulation of the same config and seed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower extra is not installed (pip install 'securefl[flower]')")

from securefl.config import load_config  # noqa: E402
from securefl.deploy.loopback import deploy_loopback  # noqa: E402
from securefl.runtime.federation import Federation  # noqa: E402
from tests.conftest import metrics_without_time  # noqa: E402

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent

def experiment(protocol: str, *, rounds: int, participants: str, extra: str, secure: str = "none",
               private: bool = True) -> str:
    """A short run on digits for three SuperNodes; ``participants``: their YAML list entries."""
    privacy = "privacy: {unit: record, delta: 1.0e-5, accountant: rdp, max_grad_norm: 1.0}\n" if private else ""
    return (f"protocol: {protocol}\nrun: {{seed: 0, rounds: {rounds}, name: flower-{protocol}}}\n"
            "data:\n  dataset: digits\n  partition: {kind: dirichlet, alpha: 0.5}\n  public_size: 200\n"
            "  val_fraction: 0.15\n"
            "training: {optimizer: sgd, lr: 0.1, momentum: 0.9, batch_size: 32, local_epochs: 1}\n"
            f"{privacy}secure_aggregation: {secure}\nparticipants:\n{participants}{extra}\n")


CONFIG = experiment("fedmd", rounds=2, secure="ckks", participants=(
    "  - {id: site_a, model: mlp_s, target_epsilon: 4}\n  - {id: site_b, model: cnn_s, target_epsilon: 8}\n"
    "  - {id: site_c, model: mlp_m, policy_file: POLICY}\n"),
    extra="fedmd: {alignment_size: 200, transfer_max_epochs: 2, revisit_epochs: 1, revisit_batch_size: 32}")
MASKING_CONFIG = experiment("fml", rounds=2, secure="masking", participants=(
    "  - {id: site_a, model: mlp_s, target_epsilon: 8}\n  - {id: site_b, model: cnn_s, target_epsilon: 8}\n"
    "  - {id: site_c, model: mlp_m, target_epsilon: 4}\n"), extra="fml: {meme_model: mlp_s}")
RESUME_CONFIG = experiment("fedh2l", rounds=3, private=False, participants=(
    "  - {id: site_a, model: mlp_s}\n  - {id: site_b, model: cnn_s}\n  - {id: site_c, model: mlp_m}\n"),
    extra="fedh2l: {seed_size: 100, seed_batch_size: 32}")


def test_private_fedmd_with_ckks_on_a_loopback_flower_deployment(tmp_path: Path) -> None:
    policy = tmp_path / "site_c_policy.yaml"
    policy.write_text("max_epsilon: 2.0\ndelta: 1.0e-5\nunit: record\n")
    config_path = tmp_path / "experiment.yaml"
    config_path.write_text(CONFIG.replace("POLICY", str(policy)))
    config = load_config(config_path)
    deployed = deploy_loopback(config_path, tmp_path / "deployment", timeout=600)
    coordinator, nodes = tmp_path / "deployment" / "coordinator", tmp_path / "deployment" / "nodes"
    rejected = [r for line in (coordinator / "metrics.jsonl").read_text().splitlines() for r in json.loads(line)["rejected"]]
    assert rejected == []

    # Every node's ledger verifies, and the state stayed on the nodes: the coordinator holds no ledger and
    # only the aggregator's own keys and card and the CKKS public context.
    for node_dir in sorted(nodes.iterdir()):
        audit = subprocess.run([str(BIN / "securefl"), "audit", str(node_dir), "--json", "--roster", str(coordinator / "keys")],
                               capture_output=True, text=True)
        assert audit.returncode == 0, audit.stdout + audit.stderr
        assert json.loads(audit.stdout)["ok"] is True
    assert not (coordinator / "ledgers").exists()
    # Each owner approved the run on its node (deploy_loopback stands in for them), and its ledger says so.
    for node_dir in sorted(nodes.iterdir()):
        approved = sorted(p.stem for p in (node_dir / "approvals").glob("*.json"))
        ledger = (node_dir / "ledgers" / f"{node_dir.name}.jsonl").read_text().splitlines()
        assert len(approved) == 1
        assert [json.loads(e)["approval_digest"] for e in ledger if '"kind":"approval"' in e] == approved
    coordinator_keys = sorted(p.name for p in (coordinator / "keys").iterdir() if p.is_file())
    assert coordinator_keys == ["aggregator.card", "aggregator.ed25519", "aggregator.x25519", "ckks_public.context"]
    by_id = {p["id"]: p for p in deployed["participants"]}
    # site_c's owner allows ε = 2; the experiment asked for nothing stricter, so its policy binds.
    assert by_id["site_c"]["target_epsilon"] == 2.0 and 0 < by_id["site_c"]["epsilon"] <= 2.0

    # DP noise and Poisson samples are secret OS entropy on every node, so a deployment equals the simulation in
    # distribution only (accuracies differ by the noise; the non-DP contract tests compare them exactly). What
    # must agree is every owner's spend and the seeded schedule.
    simulated = Federation(config, tmp_path / "simulation", progress=False).run()
    for mine, theirs in zip(deployed["participants"], simulated["participants"], strict=True):
        assert mine["id"] == theirs["id"]
        assert mine["epsilon"] == pytest.approx(theirs["epsilon"], rel=1e-9)
    assert [(r["round"], r["sampled"]) for r in metrics_without_time(coordinator)] == [
        (r["round"], r["sampled"]) for r in metrics_without_time(tmp_path / "simulation")]




@pytest.mark.slow  # six Flower phases a round (about 2.5 min); run by `make test-slow` in CI
def test_private_fml_with_pairwise_masking_on_a_loopback_flower_deployment(tmp_path: Path) -> None:
    """SecAgg's key agreement, the masked meme deltas and the unmasking all travel as Flower messages. The DP
    noise is secret OS entropy on every node, so the metrics equal the simulation's in distribution only; the
    spends and the seeded schedule equal it exactly (masking's exactness is compared without DP by the protocol
    contract's ``test_masking_between_nodes_gives_the_simulations_metrics``)."""
    config_path = tmp_path / "experiment.yaml"
    config_path.write_text(MASKING_CONFIG)
    deploy_loopback(config_path, tmp_path / "deployment", timeout=600)
    coordinator, nodes = tmp_path / "deployment" / "coordinator", tmp_path / "deployment" / "nodes"
    for node_dir in sorted(nodes.iterdir()):
        audit = subprocess.run([str(BIN / "securefl"), "audit", str(node_dir), "--json", "--roster", str(coordinator / "keys")],
                               capture_output=True, text=True)
        assert audit.returncode == 0, audit.stdout + audit.stderr
        # The node kept only its last round's SecAgg client, readable by its owner alone.
        states = list((node_dir / "keys" / "secagg").iterdir())
        assert [s.name for s in states] == [f"{node_dir.name}.round2.state"]
        assert states[0].stat().st_mode & 0o077 == 0
    assert sorted(p.name for p in (coordinator / "keys").iterdir() if p.is_file()) == [
        "aggregator.card", "aggregator.ed25519", "aggregator.x25519"]  # its own keys and card only

    deployed = json.loads((coordinator / "summary.json").read_text())
    simulated = Federation(load_config(config_path), tmp_path / "simulation", progress=False).run()
    assert [p["epsilon"] for p in deployed["participants"]] == pytest.approx(
        [p["epsilon"] for p in simulated["participants"]], rel=1e-9)
    assert [(r["round"], r["sampled"]) for r in metrics_without_time(coordinator)] == [
        (r["round"], r["sampled"]) for r in metrics_without_time(tmp_path / "simulation")]




@pytest.mark.slow  # two flwr runs of three FedH2L rounds (about 3 min)
def test_a_coordinator_killed_mid_run_on_flower_resumes_and_fedh2l_peers_talk_through_the_relay(tmp_path: Path) -> None:
    """The ServerApp process is killed (SIGKILL) once round 1 is checkpointed; `flwr run` with the same `out`
    resumes it. FedH2L's posteriors go peer to peer through the ServerApp, which only relays them. The nodes
    rewind the interrupted round, so the metrics equal an uninterrupted simulation's. (That a redone round
    stays charged in the ledgers is checked with in-process nodes in tests/deploy/test_nodes.py.)"""
    import os
    import signal
    import threading
    import time

    from securefl.deploy.loopback import LoopbackFederation, NodeSpec
    from securefl.deploy.provision import provision

    config_path = tmp_path / "experiment.yaml"
    config_path.write_text(RESUME_CONFIG)
    config = load_config(config_path)
    coordinator, nodes = tmp_path / "coordinator", tmp_path / "nodes"
    specs = [NodeSpec(p.id, nodes / p.id) for p in config.participants]
    provision(config, coordinator_dir=coordinator, node_dirs={s.participant_id: s.node_dir for s in specs})
    run_config = {"config": str(config_path), "out": str(coordinator), "timeout": 300.0, "wait-for-nodes": 120.0}
    killed: list[int] = []

    with LoopbackFederation(tmp_path / "logs", specs) as federation:
        def kill_after_round_one() -> None:
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline and not killed:
                metrics = coordinator / "metrics.jsonl"
                if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:  # rounds 0 and 1 logged
                    for pid in federation.server_app_pids():
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                time.sleep(0.2)

        watcher = threading.Thread(target=kill_after_round_one)
        watcher.start()
        federation.run(run_config, timeout=600)
        watcher.join()
        assert killed, "the ServerApp was never seen running"
        assert not (coordinator / "summary.json").exists()
        interrupted = len((coordinator / "metrics.jsonl").read_text().splitlines()) - 1
        assert 1 <= interrupted < 3

        result = federation.run(run_config, timeout=600)  # the same out: the coordinator resumes
        assert (coordinator / "summary.json").exists(), result.stdout[-3000:] + federation.log("superlink")

    relayed = [r for line in (coordinator / "metrics.jsonl").read_text().splitlines()
               for r in json.loads(line)["rejected"]]
    assert relayed == []
    simulated = tmp_path / "simulation"
    Federation(config, simulated, progress=False).run()
    deployed_rows, simulated_rows = metrics_without_time(coordinator), metrics_without_time(simulated)
    assert [r["round"] for r in deployed_rows] == [0, 1, 2, 3]
    for mine, theirs in zip(deployed_rows, simulated_rows, strict=True):
        for pid, metrics in theirs["participants"].items():
            assert mine["participants"][pid]["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert simulated_rows[-1]["mean_accuracy"] > 0.3  # learning happened: the comparison means something


def test_a_supernodes_node_config_reaches_the_participant_node_with_the_owners_settings(tmp_path: Path) -> None:
    """What a data owner writes in --node-config (as the loopback deployment writes it, parsed as Flower parses
    it) becomes that owner's node: its directory, policy file, data file, own learning rate and whether it
    requires the owner's approval."""
    from flwr.common.config import parse_config_args

    from securefl.deploy import flower
    from securefl.deploy.loopback import NodeSpec

    spec = NodeSpec("hospital_a", tmp_path / "node a", policy_file=tmp_path / "policy.yaml",
                    data_file=tmp_path / "a.csv", lr=0.02, approval=True)
    node = flower._node(parse_config_args([spec.node_config()]))
    assert node.require_approval is True
    assert (node.participant_id, node.node_dir) == ("hospital_a", tmp_path / "node a")
    assert (node.policy_file, node.data_file, node.lr) == (str(tmp_path / "policy.yaml"), str(tmp_path / "a.csv"), 0.02)
    plain = flower._node(parse_config_args([NodeSpec("hospital_b", tmp_path / "b").node_config()]))
    assert plain.lr is None and plain.require_approval is False
