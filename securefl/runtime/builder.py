"""The wiring of the participants' side, in one place: the simulation and a deployed node both build their
:class:`~securefl.runtime.host.ParticipantHost` here, so they cannot drift apart.

A host is built in this order: its participants' models (``setup_party``), then under DP their ledgers and
calibrated noise (:class:`~securefl.runtime.privacy.PrivacyRuntime`), then the layer stack, which takes the DP
layer from the privacy runtime. Checking the stack against the protocol (``Layer.check``) is the caller's: the
simulation checks its coordinator-side layers at the same time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from securefl.config import ExperimentConfig
from securefl.core.message import AGGREGATOR
from securefl.core.party import FederationContext, Party
from securefl.crypto.keystore import load_or_create_party_keys
from securefl.crypto.signing import PartyKeys
from securefl.layers.stack import build_layers
from securefl.protocols import Protocol
from securefl.runtime.host import ParticipantHost


class KeyRing:
    """Parties' Ed25519 keys (message signatures, ledger seals) from one key directory, each loaded once.

    In a simulation the coordinator and the host share one ring, because one process holds every key."""

    def __init__(self, key_dir: Path) -> None:
        self.key_dir = Path(key_dir)
        self._keys: dict[str, PartyKeys] = {}

    def __call__(self, party_id: str) -> PartyKeys:
        if party_id not in self._keys:
            self._keys[party_id] = load_or_create_party_keys(self.key_dir, party_id)
        return self._keys[party_id]

    def loaded(self) -> dict[str, PartyKeys]:
        """Every key loaded so far, by party id."""
        return dict(self._keys)


def host_participants(config: ExperimentConfig, *, run_id: str, out: Path, ctx: FederationContext, protocol: Protocol,
                      parties: Sequence[Party], hosted: Sequence[Party], keys: KeyRing,
                      side: Literal["simulation", "participant"],
                      stopped: dict[str, str] | None = None) -> ParticipantHost:
    """The participants in ``hosted`` (of the run's ``parties``), set up and wired to their layer stack.

    ``side``: ``simulation`` (this process also aggregates, and holds every party's keys) or ``participant``
    (a data owner's node, holding only its own). ``stopped`` is shared with a simulation's coordinator, so a
    participant that exhausts its budget leaves the sampling at once.
    """
    host = ParticipantHost(config=config, out=out, ctx=ctx, protocol=protocol, parties=hosted, keys=keys,
                           n_participants=len(parties), stopped=stopped)
    host.set_up()
    ids = [p.id for p in parties]
    holders = [*ids, AGGREGATOR] if side == "simulation" else [p.id for p in hosted]
    signers = {pid: keys(pid) for pid in holders} if config.signing else {}
    host.attach_layers(build_layers(
        config, side=side, run_id=run_id, key_dir=keys.key_dir, party_ids=ids, signers=signers,
        hosted=None if side == "simulation" else [p.id for p in hosted],
        privacy_layer=host.privacy.layer if host.privacy is not None else None))
    return host
