"""Finding 4 of issue 19, played by the coordinator: a sample-weighted mean under distributed DP noise.

Each owner adds a 1/sqrt(n) share of the noise and books the ε of an *unweighted* sum. A weighted mean multiplies
each noised share by its owner's record count, so the aggregate's noise, measured against what the largest owner's
payload can move it, is smaller than booked. The coordinator computes that from the counts it is sent. The set-up
must be refused before round 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.adversary.wiretap import Wiretap, run_or_refusal
from tests.conftest import tiny_config

SAME_MODELS = [{"id": f"p{i}", "model": "mlp_s"} for i in range(3)]
CASES = {
    "fedavg": {"secure_aggregation": "masking"},  # FedAvg weights by records by default
    "fml": {"secure_aggregation": "masking", "fml": {"weighting": "samples", "meme_model": "mlp_s", "batch_size": 32}},
    # FedGen's head weights are not declared to masking (which then cannot weight): CKKS weights sealed heads.
    "fedgen": {"secure_aggregation": "ckks", "fedgen": {"head_aggregation": "weighted_mean", "local_steps": 2,
                                                       "generator_steps": 2, "label_counts": "none"}},
}


@pytest.mark.parametrize("protocol", list(CASES))
def test_the_largest_owner_gets_at_least_the_noise_it_booked(tmp_path: Path, protocol: str) -> None:
    config = tiny_config(protocol=protocol, participants=SAME_MODELS, run={"rounds": 1},
                         privacy={"unit": "participant", "target_epsilon": 2.0, "noise": "distributed",
                                  "min_contributors": 1.0}, **CASES[protocol])
    tap = Wiretap()
    fed, refusal = run_or_refusal(config, tmp_path / "run", tap)
    if fed is not None:
        # The attack: the weights are the counts on the uplinks; each share's noise std is sigma*S/sqrt(n).
        weights = {m.sender: float(m.meta["num_samples"]) for m in tap.uplinks() if "num_samples" in m.meta}
        assert len(weights) == 3
        n = len(weights)
        heaviest = max(weights, key=weights.__getitem__)
        sigma = fed.privacy.participants[heaviest].noise_multiplier
        # Noise of the weighted sum over the heaviest owner's sensitivity (both divided by sum(w)).
        effective = sigma / math.sqrt(n) * math.sqrt(sum(w * w for w in weights.values())) / weights[heaviest]
        booked = next(e for e in fed.privacy.participants[heaviest].ledger.entries if e.get("kind") == "release")
        assert effective >= booked["noise_multiplier"] - 1e-9, (
            f"{protocol}: {heaviest} ({weights[heaviest]:g} records of {sum(weights.values()):g}) booked noise "
            f"multiplier {booked['noise_multiplier']:.3f}, but the weighted aggregate gives it {effective:.3f}")
    assert refusal is not None and "weight" in refusal
    assert not (tmp_path / "run").exists()
