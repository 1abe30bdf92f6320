"""Key material for a deployment: what each node and the coordinator must hold before round 1.

In a real federation every data owner creates its own Ed25519 key on its own
node and publishes only the public half; the owners' committee creates the
CKKS key pair among themselves and hands the coordinator only the public
context. :func:`provision` performs those steps for nodes whose directories
are reachable from one machine (loopback tests, the healthcare example, a
cluster with a shared provisioning step):

- ``NODE/keys/<participant>.ed25519``: created by (for) that node, never copied;
- ``NODE/keys/ckks_committee.secret``: the committee's CKKS secret (CKKS runs);
- ``COORDINATOR/keys/aggregator.ed25519`` and ``COORDINATOR/keys/ckks_public.context``:
  the coordinator gets no secret key it could decrypt with;
- ``*/keys/roster/<id>.pub``: every party's public key, on every node.

Re-running it is safe: existing keys are kept, so a provisioned node never
loses the key that seals its ledger.

Whoever runs it has held every party's private key. Across sites, run the
same steps on each party's own machine instead (:mod:`securefl.deploy.ceremony`,
``securefl keys ...``); the files are the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from securefl.crypto.keystore import load_or_create_party_keys, publish_public_key, write_private_file
from securefl.runtime.message import AGGREGATOR


def provision(config: Any, *, coordinator_dir: Path, node_dirs: Mapping[str, Path]) -> None:
    ids = [p.id for p in config.participants]
    missing = sorted(set(ids) - set(node_dirs))
    if missing:
        raise ValueError(f"no node directory for participants {missing}")
    key_dirs = {pid: Path(node_dirs[pid]) / "keys" for pid in ids}
    key_dirs[AGGREGATOR] = Path(coordinator_dir) / "keys"
    everyone = {pid: load_or_create_party_keys(key_dir, pid) for pid, key_dir in key_dirs.items()}
    for key_dir in key_dirs.values():
        for keys in everyone.values():
            publish_public_key(key_dir, keys)
    if config.secure_aggregation == "ckks":
        _provision_ckks(config, key_dirs, ids)


def _provision_ckks(config: Any, key_dirs: Mapping[str, Path], ids: list[str]) -> None:
    from securefl.crypto.ckks import KeyHolderContext
    from securefl.layers.secure_aggregation import CkksLayer

    existing = [key_dirs[pid] / CkksLayer.COMMITTEE_FILE for pid in ids if (key_dirs[pid] / CkksLayer.COMMITTEE_FILE).exists()]
    if existing:
        committee = KeyHolderContext.from_committee_secret(existing[0].read_bytes())
    else:
        committee = KeyHolderContext.generate(config.ckks)
    secret = committee.export_secret_for_committee()
    for pid in ids:
        path = key_dirs[pid] / CkksLayer.COMMITTEE_FILE
        if path.exists() and path.read_bytes() != secret:
            raise ValueError(f"{path}: holds another CKKS committee key than the other nodes; remove the stale "
                             "committee files and provision again")
        if not path.exists():
            write_private_file(path, secret)
    (key_dirs[AGGREGATOR] / CkksLayer.PUBLIC_FILE).write_bytes(committee.public().to_bytes())
