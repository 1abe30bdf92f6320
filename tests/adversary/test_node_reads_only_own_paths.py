"""Finding 10, as the coordinator: make a node read a file of the coordinator's choice, or quote a line of one.

The coordinator writes the experiment config every node receives at setup. It names paths in it
(``data.files.test_file``, ``public_file``, ``data.data_dir``, a participant's ``data_file``) and fields that
decide how a table is parsed (``label_column``). A node must read only the paths its owner configured, and the
error it sends back must never hold what a file contains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from securefl.deploy.node import ParticipantNode

SECRET = "TOPSECRET"


def _table(path: Path, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    lines = ["label,f0,f1,f2,f3"]
    for i in range(rows):
        features = ",".join(f"{v:.9f}" for v in rng.normal(size=4))
        lines.append(f"{i % 2},{features}")
    path.write_text("\n".join(lines) + "\n")


def _config(tmp_path: Path, **files: Any) -> dict[str, Any]:
    shared = tmp_path / "shared"
    shared.mkdir(exist_ok=True)
    for name, seed in (("test", 1), ("public", 2), ("p0", 3), ("p1", 4)):
        _table(shared / f"{name}.csv", 40, seed)
    return {"protocol": "local_only", "run": {"rounds": 1, "seed": 0}, "signing": False,
            "data": {"dataset": "files", "val_fraction": 0.2,
                     "files": {"label_column": "label", "num_classes": 2, "test_file": str(shared / "test.csv"),
                               "public_file": str(shared / "public.csv"), **files}},
            "participants": [{"id": pid, "model": "mlp_s", "data_file": str(shared / f"{pid}.csv")}
                             for pid in ("p0", "p1")]}


def _setup(node: ParticipantNode, raw: dict[str, Any]) -> dict[str, Any]:
    try:
        return node.handle({"phase": "setup", "run_id": "attack", "config": yaml.safe_dump(raw)})
    finally:
        node.close()


def test_a_node_refuses_a_path_its_owner_did_not_configure(tmp_path: Path) -> None:
    # A file on the node's machine the coordinator wants to read (its first line, or its SHA-256).
    secret = tmp_path / "node_machine" / "private.txt"
    secret.parent.mkdir()
    secret.write_text(f"{SECRET}_name,{SECRET}_ssn\nAlice,123-45-6789\n")
    raw = _config(tmp_path, test_file=str(secret), public_file=None)
    own_table = tmp_path / "shared" / "p0.csv"
    node = ParticipantNode(tmp_path / "node", "p0", data_file=own_table)  # the owner configured its table only

    reply = _setup(node, raw)
    assert SECRET not in repr(reply), f"the node sent the coordinator a line of {secret}: {reply}"
    assert not reply["ok"], "the node accepted a test table its owner never configured"
    assert "data.files.test_file" in reply["error"] and "test-file" in reply["error"], reply["error"]
    assert "\n" not in reply["error"]

    # The node's own table under another name: refused as well, unless the owner configured that path.
    raw = _config(tmp_path)
    raw["participants"][0]["data_file"] = str(secret)
    reply = _setup(ParticipantNode(tmp_path / "node2", "p0", public_file=tmp_path / "shared" / "public.csv",
                                   test_file=tmp_path / "shared" / "test.csv"), raw)
    assert SECRET not in repr(reply) and not reply["ok"], reply
    assert "participants.0.data_file" in reply["error"] and "data-file" in reply["error"], reply["error"]


def test_a_parse_error_sent_to_the_coordinator_quotes_no_record(tmp_path: Path) -> None:
    """The coordinator names a feature column as the label column: the owner's own table then fails to parse at
    its first record, and the error must not carry that record's (private) value."""
    raw = _config(tmp_path, label_column="f0")
    shared = tmp_path / "shared"
    node = ParticipantNode(tmp_path / "node", "p0", data_file=shared / "p0.csv", public_file=shared / "public.csv",
                           test_file=shared / "test.csv")
    reply = _setup(node, raw)
    assert not reply["ok"]
    values = [line.split(",")[1] for path in shared.glob("*.csv") for line in path.read_text().splitlines()[1:]]
    leaked = [v for v in values if v in reply["error"]]
    assert not leaked, f"the error sent to the coordinator quotes a record's value ({leaked[0]}): {reply['error']}"
    assert "line 2" in reply["error"]  # it still says where the problem is
    # The owner keeps the whole story on its node.
    assert (tmp_path / "node" / "errors.log").exists()
