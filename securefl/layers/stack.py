"""The layer stack of a run, built from the config for one side of it.

Outbound order is fixed: validation, DP, then sealing (CKKS or masking), then signing.
The same stack is built three ways, with only the key material that side may
hold:

- ``simulation``: one process plays every participant and the aggregator, so
  one stack carries both the participant hooks and the server hooks;
- ``participant``: a data owner's node — its own signing key, the CKKS
  committee secret it was provisioned with, and everyone's public keys; under
  masking, its own SecAgg client for the round;
- ``coordinator``: the aggregator's node — its own signing key, the CKKS
  *public* context (it can add ciphertexts, never decrypt), and the roster;
  under masking, the SecAgg server, which talks to the nodes through the
  channel the runtime gives it (``Layer.connect``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from securefl.core.message import AGGREGATOR
from securefl.layers.base import Layer, LayerSetupError

Side = Literal["simulation", "participant", "coordinator"]


def build_layers(config: Any, *, side: Side, run_id: str, key_dir: Path, party_ids: Sequence[str],
                 signers: Mapping[str, Any], privacy_layer: Layer | None = None,
                 hosted: Sequence[str] | None = None) -> list[Layer]:
    """``signers``: the private keys held on this side; ``party_ids``: every participant of the run;
    ``hosted``: the participants whose data this side holds (None: all)."""
    from securefl.layers.validation import ValidationLayer

    # First in the stack: its outbound check runs before DP and sealing (a broken payload is withheld
    # before anything is booked for it), and its inbound checks run after verifying and opening.
    layers: list[Layer] = [ValidationLayer(check_data=side != "coordinator", hosted=hosted)]
    public_keys: dict[str, Any] = {}

    def roster() -> dict[str, Any] | None:
        """Every party's provisioned public key, read once (None when signing is off)."""
        if not config.signing:
            return None
        if not public_keys:
            from securefl.crypto.keystore import load_roster

            public_keys.update(load_roster(key_dir, [*party_ids, AGGREGATOR]))
        return public_keys
    if privacy_layer is not None:
        layers.append(privacy_layer)
    if config.secure_aggregation == "ckks":
        from securefl.layers.secure_aggregation import CkksLayer

        if side == "simulation":
            layers.append(CkksLayer(config.ckks, key_dir=key_dir, cohort=config.cohort()))
        elif side == "participant":
            layers.append(CkksLayer.for_participant(key_dir, cohort=config.cohort()))
        else:
            layers.append(CkksLayer.for_coordinator(key_dir))
    elif config.secure_aggregation == "masking":
        from securefl.layers import secure_aggregation as sa

        # One minimum cohort t for masking and DP, from n = participation × participants (never the round's list).
        masking = {"run_id": run_id, "threshold_fraction": config.cohort_fraction(),
                   "per_round": config.cohort().per_round}
        if side == "simulation":
            layers.append(sa.MaskingLayer(**masking))
        elif side == "participant":
            if not hosted or len(hosted) != 1:
                raise LayerSetupError(f"a masking node hosts exactly one participant, got {hosted}")
            layers.append(sa.MaskingNodeLayer.for_node(config, run_id=run_id, participant_id=hosted[0], key_dir=key_dir))
        else:
            # With signing on, the coordinator drops an advertisement its sender did not sign (one bad node
            # must not make every honest node refuse the round's roster).
            layers.append(sa.MaskingCoordinatorLayer(**masking, public_keys=roster()))
    if config.signing:
        from securefl.layers.signing import SigningLayer

        if side == "simulation":
            layers.append(SigningLayer(run_id=run_id, keys=signers))
        else:
            layers.append(SigningLayer(run_id=run_id, keys=signers, public_keys=roster()))
    return layers
