"""Key material for a deployment: what each node and the coordinator must hold before round 1.

In a real federation every data owner creates its own Ed25519 key on its own
node and publishes only the public half; the owners' committee creates the
CKKS key pair among themselves and hands the coordinator only the public
context. :func:`provision` performs those steps for nodes whose directories
are reachable from one machine (loopback tests, the healthcare example, a
cluster with a shared provisioning step):

- ``NODE/keys/<participant>.ed25519`` and ``.x25519``: created by (for) that node, never copied;
- ``NODE/keys/ckks_committee.secret``: the committee's CKKS secret (CKKS runs);
- ``COORDINATOR/keys/aggregator.ed25519`` and ``COORDINATOR/keys/ckks_public.context``:
  the coordinator gets no secret key it could decrypt with;
- ``*/keys/roster/<id>.pub`` and ``<id>.transport.pub``: every party's public keys, on every node.

Re-running it is safe: existing keys are kept, so a provisioned node never
loses the key that seals its ledger.

It runs every party's step of the key ceremony
(:mod:`securefl.deploy.ceremony`), so whoever runs it has held every party's
private key. Across sites, each party runs its own step on its own machine
instead (``securefl keys ...``); the code and the files are the same.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

from securefl.config import ExperimentConfig
from securefl.core.message import AGGREGATOR
from securefl.deploy.ceremony import create_committee, create_party, install_public_context, join_committee, trust_card


def provision(config: ExperimentConfig, *, coordinator_dir: Path, node_dirs: Mapping[str, Path]) -> None:
    """Every party's ceremony step (:mod:`securefl.deploy.ceremony`), run here for directories this machine
    reaches: the same code and files as across sites, without the phone calls."""
    ids = [p.id for p in config.participants]
    missing = sorted(set(ids) - set(node_dirs))
    if missing:
        raise ValueError(f"no node directory for participants {missing}")
    key_dirs = {pid: Path(node_dirs[pid]) / "keys" for pid in ids}
    key_dirs[AGGREGATOR] = Path(coordinator_dir) / "keys"
    cards = [create_party(key_dir, pid)[0] for pid, key_dir in key_dirs.items()]
    for key_dir in key_dirs.values():
        for card in cards:
            # Every card was made here a moment ago, so its fingerprint is known first-hand: no phone call needed.
            trust_card(key_dir, card.to_bytes(), source=f"{card.party_id}'s card", expected_fingerprint=card.fingerprint)
    if config.secure_aggregation == "ckks":
        from securefl.layers.secure_aggregation import CkksLayer

        # An owner that already holds the committee key hands it on (a re-run keeps what sealed state needs).
        creator = next((pid for pid in ids if (key_dirs[pid] / CkksLayer.COMMITTEE_FILE).exists()), ids[0])
        with tempfile.TemporaryDirectory() as outbox:
            create_committee(config, key_dirs[creator], creator, outbox)
            for pid in ids:
                if pid != creator:
                    envelope = Path(outbox) / f"ckks_committee.for-{pid}.envelope"
                    join_committee(config, key_dirs[pid], pid, envelope.read_bytes())
            install_public_context(config, key_dirs[AGGREGATOR], (Path(outbox) / CkksLayer.PUBLIC_FILE).read_bytes())
