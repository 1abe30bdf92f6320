"""Finding 2, as the coordinator: switch DP off (or weaken the setup) on a data owner's node.

The coordinator writes the experiment config it sends to every node at ``setup``. Here it sends the
healthcare example with DP off, with no secure aggregation, with signing off, with a smaller cohort, with
a larger δ, or with a changed protocol hyperparameter, to nodes whose owners hold strict policy files
and approved the honest setup (``securefl approve``). Every such node must refuse, in one line naming
what is wrong. Before the fix the nodes trained as told (the attack succeeded), which is how these tests
fail there. Also: an approval file altered on the node's disk is refused, and the approval the run goes
ahead under is in the participant's ledger and shown by the audit.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from securefl.cli import main
from securefl.config import parse_config
from securefl.deploy.node import ParticipantNode
from securefl.deploy.provision import provision
from securefl.deploy.remote import RemoteSetupError, isolated_participants
from securefl.privacy.audit import audit_run
from securefl.privacy.ledger import read_ledger
from securefl.runtime.federation import Federation
from tests.deploy.test_nodes import healthcare_raw as healthcare_example

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "healthcare"
HOSPITALS = ("hospital_a", "hospital_b", "hospital_c", "hospital_d")


def healthcare_raw(data: Path) -> dict[str, Any]:
    """The healthcare example (FedMD, record-level DP, CKKS, signing), on fresh data, one round."""
    return healthcare_example(data, rounds=1)


def dp_off(raw: dict[str, Any]) -> dict[str, Any]:
    raw["privacy"] = {"unit": "none"}
    for p in raw["participants"]:
        p.pop("target_epsilon", None)
    return raw


ATTACKS = {
    "privacy.unit": dp_off,
    "secure_aggregation": lambda raw: {**raw, "secure_aggregation": "none"},
    "signing": lambda raw: {**raw, "signing": False},
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Four provisioned hospital nodes whose owners each approved the honest config."""
    root = tmp_path_factory.mktemp("owner_approval")
    spec = importlib.util.spec_from_file_location("make_data", EXAMPLE / "make_data.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    module.main(["--out", str(root / "data")])
    raw = healthcare_raw(root / "data")
    config_path = root / "honest.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    config = parse_config(raw)
    nodes_root = root / "nodes"
    provision(config, coordinator_dir=root / "coordinator", node_dirs={h: nodes_root / h for h in HOSPITALS})
    codes = {h: owner_approves(config_path, nodes_root / h, h, root / "data") for h in HOSPITALS}
    return {"root": root, "raw": raw, "nodes": nodes_root, "codes": codes}


def owner_approves(config_path: Path, node_dir: Path, pid: str, data: Path) -> Any:
    """The owner reads the proposed run and approves it with its node's key (``securefl approve --yes``)."""
    try:
        return main(["approve", str(config_path), "--node-dir", str(node_dir), "--participant", pid,
                     "--policy", str(EXAMPLE / "policies" / f"{pid}.yaml"), "--data-file", str(data / f"{pid}.csv"),
                     "--public-file", str(data / "public.csv"), "--test-file", str(data / "test.csv"), "--yes"])
    except SystemExit as exc:  # a securefl without `approve`: the owner has no say, and the attacks go through
        return exc.code


def copy_nodes(site: dict[str, Any], name: str) -> Path:
    target = site["root"] / name
    shutil.copytree(site["nodes"], target)
    return target


def setup_reply(site: dict[str, Any], nodes: Path, pid: str, raw: dict[str, Any], run_id: str) -> dict[str, Any]:
    """What the coordinator gets back when it sends ``raw`` to ``pid``'s node at setup."""
    node = ParticipantNode(nodes / pid, pid, policy_file=EXAMPLE / "policies" / f"{pid}.yaml",
                           data_file=site["root"] / "data" / f"{pid}.csv", public_file=site["root"] / "data" / "public.csv",
                           test_file=site["root"] / "data" / "test.csv")
    try:
        return node.handle({"phase": "setup", "run_id": run_id, "config": yaml.safe_dump(raw)})
    finally:
        node.close()


def test_the_owners_approvals_are_signed_on_their_nodes(site: dict[str, Any]) -> None:
    assert site["codes"] == dict.fromkeys(HOSPITALS, 0)
    for h in HOSPITALS:
        approvals = list((site["nodes"] / h / "approvals").glob("*.json"))
        assert len(approvals) == 1 and json.loads(approvals[0].read_text())["signature"]


@pytest.mark.parametrize("field", list(ATTACKS))
def test_every_node_refuses_a_config_that_switches_off_what_its_owner_requires(site: dict[str, Any],
                                                                              field: str) -> None:
    """Over the in-process node path: DP off, secure aggregation off, or signing off is refused by all four
    hospitals before round 1, each with one line naming the field."""
    raw = ATTACKS[field](healthcare_raw(site["root"] / "data"))
    config = parse_config(raw)
    nodes = copy_nodes(site, f"nodes_{field}")
    remote, _ = isolated_participants(config, nodes)
    coordinator = site["root"] / f"coordinator_{field}"
    shutil.copytree(site["root"] / "coordinator", coordinator)  # the provisioned coordinator's keys
    with pytest.raises(RemoteSetupError) as refused:
        Federation(config, coordinator, progress=False, remote=remote)
    reasons = str(refused.value).split("; node ")
    message = str(refused.value)
    assert "\n" not in message
    for h in HOSPITALS:
        reason = next((r for r in reasons if f"'{h}': refused" in r), None)
        assert reason is not None, f"{h} did not refuse: {message}"
        assert field in reason
    assert not any((nodes / h / "run.json").exists() for h in HOSPITALS)  # nothing was set up


@pytest.mark.parametrize("change, named", [
    (lambda raw: raw["privacy"].update(delta=1e-3), "privacy.delta"),
    (lambda raw: raw["privacy"].update(min_contributors=0.34), "privacy.min_contributors"),
    (lambda raw: raw["fedmd"].update(revisit_epochs=3), "fedmd.revisit_epochs"),
    (lambda raw: raw["run"].update(rounds=50), "run.rounds"),
], ids=["larger-delta", "smaller-cohort", "protocol-hyperparameter", "more-rounds"])
def test_a_node_refuses_a_setup_its_owner_did_not_approve(site: dict[str, Any], change: Any, named: str) -> None:
    raw = healthcare_raw(site["root"] / "data")
    change(raw)
    nodes = copy_nodes(site, f"nodes_{named}")
    reply = setup_reply(site, nodes, "hospital_c", raw, "attack")
    assert not reply["ok"], "the node accepted a setup its owner never approved"
    assert named in reply["error"] and "refused" in reply["error"] and "\n" not in reply["error"]


def test_a_policy_alone_refuses_dp_off_and_a_larger_delta(site: dict[str, Any], tmp_path: Path) -> None:
    """A node with no approval at all, only its owner's (old-format) policy file: DP off or δ above the
    policy's is refused, and the node keeps no state of that run."""
    raw = healthcare_raw(site["root"] / "data")
    raw["secure_aggregation"] = "none"  # nodes here hold no keys of a committee
    nodes = tmp_path / "nodes"
    config = parse_config(raw)
    provision(config, coordinator_dir=tmp_path / "c", node_dirs={h: nodes / h for h in HOSPITALS})
    policy = tmp_path / "policy.yaml"
    policy.write_text("participant: hospital_c\nmax_epsilon: 2.0\ndelta: 1.0e-5\nunit: record\n")
    for attack, named in ((dp_off, "privacy.unit"), (lambda r: {**r, "privacy": {**r["privacy"], "delta": 1e-3}},
                                                      "privacy.delta")):
        node = ParticipantNode(nodes / "hospital_c", "hospital_c", policy_file=policy,
                               data_file=site["root"] / "data" / "hospital_c.csv",
                               public_file=site["root"] / "data" / "public.csv",
                               test_file=site["root"] / "data" / "test.csv")
        sent = yaml.safe_dump(attack(copy.deepcopy(raw)))
        reply = node.handle({"phase": "setup", "run_id": f"attack-{named}", "config": sent})
        node.close()
        assert not reply["ok"], f"a node with a policy accepted {named} from the coordinator"
        assert named in reply["error"] and "policy" in reply["error"] and "\n" not in reply["error"]
        assert not (nodes / "hospital_c" / "run.json").exists()


def test_an_altered_approval_file_is_refused(site: dict[str, Any]) -> None:
    """Someone edits the approval on the node's disk (here: a weaker δ in what was approved); its signature no
    longer verifies, and the node refuses even the setup the file names."""
    nodes = copy_nodes(site, "nodes_tampered")
    for path in (nodes / "hospital_a" / "approvals").glob("*.json"):
        approval = json.loads(path.read_text())
        approval["settings"]["privacy"]["delta"] = 1e-3
        path.write_text(json.dumps(approval))
    reply = setup_reply(site, nodes, "hospital_a", healthcare_raw(site["root"] / "data"), "honest")
    assert not reply["ok"], "the node trusted an approval file that was altered"
    assert "signature" in reply["error"] and "\n" not in reply["error"]


def test_the_ledger_records_the_approval_and_the_audit_shows_it(site: dict[str, Any]) -> None:
    nodes = copy_nodes(site, "nodes_honest")
    reply = setup_reply(site, nodes, "hospital_b", healthcare_raw(site["root"] / "data"), "honest")
    assert reply["ok"], reply
    digests = [p.stem for p in (nodes / "hospital_b" / "approvals").glob("*.json")]
    entries = read_ledger(nodes / "hospital_b" / "ledgers" / "hospital_b.jsonl").entries
    recorded = [e for e in entries if e["kind"] == "approval"]
    assert digests, "the owner could not approve"
    assert [e["approval_digest"] for e in recorded] == digests, "the ledger holds no record of the approval"
    assert recorded[0]["approved"]["settings"]["privacy"]["unit"] == "record"
    shown = audit_run(nodes / "hospital_b").format_table()
    assert f"hospital_b: approved {digests[0][:12]}" in shown
