"""A data owner's node: its data, its policy and its state stay under its control."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from securefl.config import dump_config, parse_config
from securefl.deploy.node import NODE_CHECKPOINT, ParticipantNode, settings_from_config
from securefl.deploy.provision import provision
from securefl.deploy.remote import RemoteParticipants, RemoteSetupError, isolated_participants, local_exchange
from securefl.privacy.audit import audit_run
from securefl.runtime.checkpoint import load_checkpoint
from securefl.runtime.federation import Federation
from tests.conftest import tiny_raw

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "healthcare"


def healthcare_raw(data: Path, **run: object) -> dict:
    """The healthcare example's config, pointed at freshly written data files, shortened for tests."""
    raw = yaml.safe_load((EXAMPLE / "experiment.yaml").read_text())
    files = raw["data"]["files"]
    files["test_file"], files["public_file"] = str(data / "test.csv"), str(data / "public.csv")
    for p in raw["participants"]:
        p["data_file"] = str(data / f"{p['id']}.csv")
        p["policy_file"] = str(EXAMPLE / "policies" / f"{p['id']}.yaml")
    raw["run"].update({"rounds": 2, **run})
    return raw


def test_healthcare_example_runs_in_process_and_its_audit_passes(hospital_data: Path, tmp_path: Path) -> None:
    config = parse_config(healthcare_raw(hospital_data))
    summary = Federation(config, tmp_path / "run", progress=False).run()
    assert audit_run(tmp_path / "run").ok
    by_id = {p["id"]: p for p in summary["participants"]}
    # hospital_a asked for 8 in the experiment but its owner's policy says 4: the stricter binds.
    assert by_id["hospital_a"]["target_epsilon"] == 4.0 and "policy" in by_id["hospital_a"]["budget_note"]
    assert by_id["hospital_b"]["target_epsilon"] == 2.0  # the experiment is stricter than b's policy (8)
    for pid, p in by_id.items():
        assert 0 < p["epsilon"] <= p["target_epsilon"]
        page = (tmp_path / "run" / "participants" / f"{pid}.md").read_text()
        assert f"{p['epsilon']:.3f}" in page and "securefl audit" in page
    # Under DP an exact record count never leaves its owner (issue 19, finding 7).
    assert all("train_records" not in p for p in by_id.values())


def test_a_node_enforces_its_own_policy_and_reads_only_its_own_file(hospital_data: Path, tmp_path: Path) -> None:
    """The coordinator's config says hospital_c may spend ε = 50 under a lax policy file, and points at a data
    file that does not exist on the coordinator's side; the node uses its owner's policy (ε ≤ 2) and file."""
    raw = healthcare_raw(hospital_data)
    lax = tmp_path / "lax.yaml"
    lax.write_text("max_epsilon: 50\ndelta: 1.0e-5\nunit: record\n")
    own_file = tmp_path / "owner_only" / "hospital_c.csv"
    own_file.parent.mkdir()
    shutil.copy(hospital_data / "hospital_c.csv", own_file)
    for p in raw["participants"]:
        if p["id"] == "hospital_c":
            p.update(target_epsilon=50, policy_file=str(lax), data_file=str(tmp_path / "not_here.csv"))
    config = parse_config(raw)
    nodes = {p.id: ParticipantNode(tmp_path / "nodes" / p.id, p.id, policy_file=p.policy_file,
                                   **settings_from_config(config, p.id))
             for p in config.participants}
    nodes["hospital_c"] = ParticipantNode(tmp_path / "nodes" / "hospital_c", "hospital_c",
                                          policy_file=EXAMPLE / "policies" / "hospital_c.yaml",
                                          **{**settings_from_config(config, "hospital_c"), "data_file": own_file})
    provision(config, coordinator_dir=tmp_path / "coordinator", node_dirs={pid: tmp_path / "nodes" / pid for pid in nodes})
    remote = RemoteParticipants(local_exchange(nodes, fresh_process=True), list(nodes))
    summary = Federation(config, tmp_path / "coordinator", progress=False, remote=remote).run()
    c = next(p for p in summary["participants"] if p["id"] == "hospital_c")
    assert c["target_epsilon"] == 2.0 and c["epsilon"] <= 2.0
    # Pinned to the roster the coordinator was provisioned with, from outside the node's directory.
    assert audit_run(tmp_path / "nodes" / "hospital_c", roster=tmp_path / "coordinator" / "keys").ok
    ledger_file = tmp_path / "nodes" / "hospital_c" / "ledgers" / "hospital_c.jsonl"
    ledger = [json.loads(line) for line in ledger_file.read_text().splitlines()]
    assert ledger and all(e.get("epsilon_after", 0) <= 2.0 + 1e-9 for e in ledger if "epsilon_after" in e)
    assert (tmp_path / "nodes" / "hospital_c" / "report.md").exists()


def test_a_node_trains_at_its_owners_learning_rate_not_the_coordinators(hospital_data: Path, tmp_path: Path) -> None:
    """The coordinator's config gives hospital_c lr 0.5 and hospital_d none; hospital_c's owner set 0.02 on its
    node. hospital_c's private optimizer runs at 0.02, hospital_d's at the experiment's 0.1, and the node's
    own config and report and the coordinator's summary say so."""
    raw = healthcare_raw(hospital_data, rounds=1)
    for p in raw["participants"]:
        if p["id"] == "hospital_c":
            p["lr"] = 0.5
    config = parse_config(raw)
    remote, nodes = isolated_participants(config, tmp_path / "nodes")
    nodes["hospital_c"].lr = 0.02
    provision(config, coordinator_dir=tmp_path / "coordinator", node_dirs={pid: tmp_path / "nodes" / pid for pid in nodes})
    summary = Federation(config, tmp_path / "coordinator", progress=False, remote=remote).run()

    def private_rate(pid: str) -> float:  # from the node's own checkpoint of its optimizer
        state = load_checkpoint(tmp_path / "nodes" / pid / NODE_CHECKPOINT)["parties"][pid]["state"]
        return state["private_opt"]["param_groups"][0]["lr"]

    rates = {pid: private_rate(pid) for pid in nodes}
    assert rates == {"hospital_a": 0.1, "hospital_b": 0.1, "hospital_c": 0.02, "hospital_d": 0.1}
    accepted = yaml.safe_load((tmp_path / "nodes" / "hospital_c" / "config.yaml").read_text())
    assert next(p for p in accepted["participants"] if p["id"] == "hospital_c")["lr"] == 0.02
    assert "own lr 0.02" in (tmp_path / "nodes" / "hospital_c" / "report.md").read_text()
    assert "own lr" not in (tmp_path / "nodes" / "hospital_d" / "report.md").read_text()
    # The coordinator's summary says what the node trained at, not what the coordinator's config asked for.
    assert {p["id"]: p.get("lr") for p in summary["participants"]} == {
        "hospital_a": None, "hospital_b": None, "hospital_c": 0.02, "hospital_d": None}


def test_a_node_refuses_a_bad_learning_rate_naming_the_field(hospital_data: Path, tmp_path: Path) -> None:
    config = parse_config(healthcare_raw(hospital_data))
    remote, nodes = isolated_participants(config, tmp_path / "nodes")
    nodes["hospital_b"].lr = "fast"
    provision(config, coordinator_dir=tmp_path / "c", node_dirs={pid: tmp_path / "nodes" / pid for pid in nodes})
    with pytest.raises(RemoteSetupError, match=r"participants\.1\.lr.*fast"):
        Federation(config, tmp_path / "c", progress=False, remote=remote)


def test_a_node_refuses_a_second_run_over_its_ledger_and_reports_setup_errors(hospital_data: Path, tmp_path: Path) -> None:
    config = parse_config(healthcare_raw(hospital_data, name="first"))
    remote, nodes = isolated_participants(config, tmp_path / "nodes")
    provision(config, coordinator_dir=tmp_path / "c1", node_dirs={pid: tmp_path / "nodes" / pid for pid in nodes})
    Federation(config, tmp_path / "c1", progress=False, remote=remote).run()
    second = parse_config(healthcare_raw(hospital_data, name="second"))
    remote2, _ = isolated_participants(second, tmp_path / "nodes")
    shutil.copytree(tmp_path / "c1" / "keys", tmp_path / "c2" / "keys")  # the same coordinator, a new run directory
    provision(second, coordinator_dir=tmp_path / "c2", node_dirs={pid: tmp_path / "nodes" / pid for pid in nodes})
    # Run ids carry the run's name and a random part (names repeat; ids must not).
    with pytest.raises(RemoteSetupError, match="holds run 'first-[0-9a-f]{12}'; refusing to start run 'second-[0-9a-f]{12}'"):
        Federation(second, tmp_path / "c2", progress=False, remote=remote2)


def test_a_node_without_keys_refuses_a_ckks_run_with_the_reason(hospital_data: Path, tmp_path: Path) -> None:
    config = parse_config(healthcare_raw(hospital_data))
    remote, nodes = isolated_participants(config, tmp_path / "nodes")  # never provisioned
    with pytest.raises(RemoteSetupError, match="no public key|committee key"):
        Federation(config, tmp_path / "c", progress=False, remote=remote)


@pytest.mark.parametrize("private", [False, True], ids=["no-dp", "participant-dp"])
def test_a_coordinator_that_crashes_mid_round_resumes(tmp_path: Path, private: bool) -> None:
    """The coordinator dies after the nodes stepped in round 2 but before their update; resumed, it redoes
    round 2 and the nodes rewind to where round 2 started. Without DP the metrics equal an uninterrupted
    run's. With DP the first attempt's spend stays booked (a redone round is charged twice, never
    under-counted): budgets still hold and every audit passes, though a budget may now run out earlier."""
    from tests.conftest import metrics_without_time, tiny_config

    # FedAvg trains in client_step, so a step done twice without rewinding would change the model.
    same_models = [{"id": f"p{i}", "model": "cnn_s"} for i in range(3)]
    config = tiny_config(protocol="fedavg", participants=same_models, run={"rounds": 3},
                         **({"privacy": {"unit": "participant", "target_epsilon": 20.0},
                             "fedavg": {"weighting": "uniform"}} if private else {}))

    def deployment(name: str):  # type: ignore[no-untyped-def]
        remote, nodes = isolated_participants(config, tmp_path / name / "nodes", fresh_process=True)
        provision(config, coordinator_dir=tmp_path / name / "coordinator",
                  node_dirs={pid: tmp_path / name / "nodes" / pid for pid in nodes})
        return remote

    Federation(config, tmp_path / "full" / "coordinator", progress=False, remote=deployment("full")).run()

    class Crash(Exception):
        pass

    class CrashingParticipants(RemoteParticipants):
        def update(self, rnd, inboxes):  # type: ignore[no-untyped-def]
            if rnd == 2:
                raise Crash
            return super().update(rnd, inboxes)

    remote = deployment("cut")
    crashing = CrashingParticipants(remote.exchange, remote.participant_ids)
    with pytest.raises(Crash):
        Federation(config, tmp_path / "cut" / "coordinator", progress=False, remote=crashing).run()
    resumed = RemoteParticipants(remote.exchange, remote.participant_ids)
    summary = Federation(config, tmp_path / "cut" / "coordinator", progress=False, remote=resumed, resume=True).run()
    cut, full = metrics_without_time(tmp_path / "cut" / "coordinator"), metrics_without_time(tmp_path / "full" / "coordinator")
    if not private:
        assert cut == full
        return
    # DP noise is secret OS entropy, so the runs agree in distribution only: exactly before any release
    # (round 0), and in the seeded, non-private schedule (who was sampled) every round.
    assert cut[0] == full[0]
    assert [(r["round"], r["sampled"]) for r in cut] == [(r["round"], r["sampled"]) for r in full]
    for node in sorted((tmp_path / "cut" / "nodes").iterdir()):
        report = audit_run(node, roster=tmp_path / "cut" / "coordinator" / "keys")
        assert report.ok
        full_report = audit_run(tmp_path / "full" / "nodes" / node.name, roster=tmp_path / "full" / "coordinator" / "keys")
        assert report.rows[0].epsilon_reported >= full_report.rows[0].epsilon_reported
    assert all(p["epsilon"] <= p["target_epsilon"] for p in summary["participants"])


@pytest.mark.parametrize("damage, needle", [
    (lambda text: text.replace(",1\n", ",x\n", 1), "line 2: not a number"),
    (lambda text: text[: len(text) // 2].rsplit(",", 3)[0] + "\n", "fields, the header has 31"),
    (lambda text: text.replace("diagnosis", "label", 1), "no label column 'diagnosis'"),
    (lambda text: "", "is empty"),
], ids=["non-numeric", "truncated", "no-label-column", "empty"])
def test_a_damaged_owner_file_is_named_before_round_one(hospital_data: Path, tmp_path: Path, damage, needle) -> None:
    from securefl.data.datasets import DataError

    data = tmp_path / "data"
    shutil.copytree(hospital_data, data)
    target = data / "hospital_b.csv"
    target.write_text(damage(target.read_text()))
    with pytest.raises(DataError, match=f"participant 'hospital_b': {target}.*{needle}"):
        Federation(parse_config(healthcare_raw(data)), tmp_path / "run", progress=False)


def test_a_node_reads_the_shared_tables_from_its_own_paths_and_they_must_match(hospital_data: Path,
                                                                                 tmp_path: Path) -> None:
    """hospital_d keeps the public and test tables elsewhere on its machine. An identical copy is accepted;
    a public table that differs by one value (another version of the file) stops the run before round 1,
    naming the node."""
    config = parse_config(healthcare_raw(hospital_data))
    own = tmp_path / "d_machine"
    own.mkdir()
    shutil.copy(hospital_data / "test.csv", own / "test.csv")
    shutil.copy(hospital_data / "public.csv", own / "public.csv")

    def connect(name: str) -> None:
        nodes = {p.id: ParticipantNode(tmp_path / name / p.id, p.id, policy_file=p.policy_file,
                                       **settings_from_config(config, p.id)) for p in config.participants}
        nodes["hospital_d"] = ParticipantNode(tmp_path / name / "hospital_d", "hospital_d",
                                              data_file=hospital_data / "hospital_d.csv",
                                              public_file=own / "public.csv", test_file=own / "test.csv")
        provision(config, coordinator_dir=tmp_path / name / "coordinator",
                  node_dirs={pid: tmp_path / name / pid for pid in nodes})
        RemoteParticipants(local_exchange(nodes), list(nodes)).connect(run_id=name, config_text=dump_config(config))

    connect("same")
    lines = (own / "public.csv").read_text().splitlines()
    header, first = lines[0].split(","), lines[1].split(",")
    column = next(i for i, name in enumerate(header) if name != "diagnosis")
    first[column] = str(float(first[column]) + 1.0)
    (own / "public.csv").write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    with pytest.raises(RemoteSetupError, match=r"not hold the same public set \(hospital_a, hospital_b, hospital_c "
                                               r"hold \w+…; hospital_d holds \w+…\)"):
        connect("differs")
    refusing = ParticipantNode(tmp_path / "x", "p0", public_file=own / "public.csv")
    reply = refusing.handle({"phase": "setup", "run_id": "r", "config": dump_config(parse_config(tiny_raw()))})
    assert not reply["ok"] and "data.dataset is 'digits', not 'files'" in reply["error"]
