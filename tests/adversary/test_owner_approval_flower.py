"""The coordinator of a real Flower deployment tries to switch the healthcare owners' protections off.

A SuperLink and one SuperNode per hospital run as OS processes on loopback. Each hospital approved the
healthcare experiment on its node (as ``securefl approve --yes`` would) and holds its policy file, which
requires CKKS and signing. The coordinator then starts runs whose config has ``privacy.unit: none``, no
secure aggregation, or signing off: every node must refuse, each with one line naming the reason, and no
node may train, write a ledger entry or report metrics.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("flwr", reason="the Flower extra is not installed (pip install 'securefl[flower]')")

from securefl.config import load_config  # noqa: E402
from securefl.deploy.loopback import LoopbackFederation, NodeSpec, _paths, approve_on_nodes  # noqa: E402
from securefl.deploy.node import settings_from_config  # noqa: E402
from securefl.deploy.provision import provision  # noqa: E402
from tests.adversary.test_owner_approval import dp_off  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
HEALTHCARE = ROOT / "examples" / "healthcare"
HOSPITALS = ("hospital_a", "hospital_b", "hospital_c", "hospital_d")

WEAKENED = {
    "privacy.unit: none": (dp_off, "privacy.unit"),
    "secure_aggregation: none": (lambda raw: {**raw, "secure_aggregation": "none"}, "secure_aggregation"),
    "signing: false": (lambda raw: {**raw, "signing": False}, "signing"),
}


def _absolute(raw: dict) -> dict:
    """The example names its files relative to the repository; the ServerApp runs elsewhere."""
    for p in raw["participants"]:
        for key in ("data_file", "policy_file"):
            if p.get(key):
                p[key] = str(ROOT / p[key])
    files = raw.get("data", {}).get("files", {})
    for key, value in list(files.items()):
        if key.endswith("_file") and value:
            files[key] = str(ROOT / value)
    return raw


def test_every_hospital_refuses_a_weakened_config_over_flower(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(HEALTHCARE / "make_data.py")], check=True, cwd=ROOT, capture_output=True)
    raw = _absolute(yaml.safe_load((HEALTHCARE / "experiment.yaml").read_text()))
    approved_path = tmp_path / "approved.yaml"
    approved_path.write_text(yaml.safe_dump(raw))
    config = load_config(approved_path)
    out = tmp_path / "deployment"
    specs = [NodeSpec(p.id, out / "nodes" / p.id, policy_file=Path(p.policy_file), lr=p.lr,
                      **_paths(settings_from_config(config, p.id))) for p in config.participants]
    provision(config, coordinator_dir=out / "coordinator", node_dirs={s.participant_id: s.node_dir for s in specs})
    approve_on_nodes(config, specs)

    with LoopbackFederation(out / "logs", specs) as federation:
        for i, (name, (weaken, field)) in enumerate(WEAKENED.items()):
            bad = weaken(yaml.safe_load(approved_path.read_text()))
            bad_path = tmp_path / f"weakened_{i}.yaml"
            bad_path.write_text(yaml.safe_dump(bad))
            coordinator = out / f"coordinator_{i}"
            result = federation.run({"config": str(bad_path), "out": str(coordinator), "timeout": 300.0,
                                     "wait-for-nodes": 120.0}, timeout=900)
            log = result.stdout + result.stderr
            for hospital in HOSPITALS:
                # The coordinator's error joins the nodes' one-line reasons with "; node '...".
                refusal = re.search(rf"node '{hospital}': refused: (.*?)(?=; node '|$)", log, re.MULTILINE)
                assert refusal, f"{name}: {hospital} did not refuse over Flower:\n{log[-4000:]}"
                assert field in refusal.group(1), f"{name}: {hospital}'s refusal does not name {field}: {refusal[0]}"
            assert not (coordinator / "summary.json").exists()
            assert not (coordinator / "metrics.jsonl").exists() or not (coordinator / "metrics.jsonl").read_text()

    # Nothing ran on any node: no ledger entry beyond what an approved run would write, no checkpoint.
    for spec in specs:
        assert not (spec.node_dir / "checkpoints" / "node.pt").exists(), spec.participant_id
        assert not list((spec.node_dir / "ledgers").glob("*.jsonl")), spec.participant_id
