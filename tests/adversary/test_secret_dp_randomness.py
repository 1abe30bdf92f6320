"""Issue 19, finding 1, played by the coordinator: it wrote the config, so it knows the run's seed.

If any DP random value (participant-level noise, DP-SGD's Poisson sample and noise, FedGen's histogram
noise) were a function of that seed, the coordinator could regenerate it: subtract the noise and recover the
clipped payload, cancel the noise of two releases, or predict the sample. Each test performs the attack
exactly as the code drew its randomness before the fix, and asserts it now fails (residual at the noise's scale).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from securefl.core.message import AGGREGATOR, Message
from securefl.core.seeding import derive_seed, seeded
from securefl.privacy.dp_sgd import DPSGDTrainer
from securefl.privacy.mechanisms import clip_payload
from securefl.runtime.federation import Federation
from tests.conftest import tiny_config
from tests.protocols.contract import RecordingTransport

CLIP = 5.0
FAST = {"fedmd": {"alignment_size": 60, "transfer_max_epochs": 1, "revisit_epochs": 1},
        "participants": [{"id": f"p{i}", "model": "mlp_s"} for i in range(3)], "run": {"rounds": 1}}
PARTICIPANT_DP = {"privacy": {"unit": "participant", "clip_norm": CLIP},
                  "participants": [{"id": f"p{i}", "model": "mlp_s", "target_epsilon": 4.0} for i in range(3)]}


def _seeded_generator(seed: int, *purpose: object) -> torch.Generator:
    """What the coordinator computes from the config's seed (FederationContext.generator's derivation)."""
    return torch.Generator().manual_seed(derive_seed(seed, *purpose))


def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


class _Recorded:
    """A finished run as the coordinator saw it (uplinks), plus the oracle's raw payloads (to score the attack)."""

    def __init__(self, out: Path, **changes: Any) -> None:
        self.config = tiny_config(**{**FAST, **changes})
        self.transport = RecordingTransport()
        self.fed = Federation(self.config, out, progress=False, transport=self.transport)
        self.raw: dict[tuple[str, int, str], torch.Tensor] = {}
        step = self.fed.protocol.client_step

        def recording_step(party: Any, inbox: Any, rnd: int) -> Any:
            reply = step(party, inbox, rnd)
            if isinstance(reply, Message) and isinstance(reply.payload.get("logits"), torch.Tensor):
                self.raw[(party.id, rnd, reply.kind)] = reply.payload["logits"].detach().clone()
            return reply

        self.fed.protocol.client_step = recording_step  # type: ignore[method-assign]
        self.summary = self.fed.run()

    def uplinks(self) -> list[Message]:
        return [m for m in self.transport.sent
                if m.receiver == AGGREGATOR and isinstance(m.payload.get("logits"), torch.Tensor)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, _Recorded]:
    base = tmp_path_factory.mktemp("runs")
    return {name: _Recorded(base / name, **changes)
            for name, changes in [("dp_a", PARTICIPANT_DP), ("dp_b", PARTICIPANT_DP), ("plain_a", {}), ("plain_b", {})]}


def test_a_coordinator_cannot_regenerate_participant_noise_from_the_seed(runs: dict[str, _Recorded]) -> None:
    """(a) Local noise: regenerate it as ``ctx.generator("participant-dp-noise", pid, rnd)`` did, subtract it,
    and compare with the clipped payload. Before the fix the residual was ~1e-6; now it is the noise itself."""
    run = runs["dp_a"]
    sigmas = {p["id"]: p["noise_multiplier"] for p in run.summary["participants"]}
    uplinks = run.uplinks()
    assert uplinks
    for msg in uplinks:
        released = msg.tensor("logits")
        std = sigmas[msg.sender] * 2 * CLIP  # replace-one: Δ = 2C
        guessed_noise = torch.randn(released.shape, generator=_seeded_generator(
            run.config.run.seed, "participant-dp-noise", msg.sender, msg.round), dtype=released.dtype)
        clipped = clip_payload(run.raw[(msg.sender, msg.round, msg.kind)], clip_norm=CLIP)
        residual = released - std * guessed_noise - clipped
        assert _rms(residual) > 0.3 * std, (
            f"{msg.sender} round {msg.round}: the seed's noise, subtracted, leaves the clipped payload to "
            f"{_rms(residual):.2e} (noise std {std:.2f})")


def test_the_same_dp_config_run_twice_releases_different_noise_and_plain_runs_are_bit_identical(
        runs: dict[str, _Recorded]) -> None:
    """(b) Without DP the run is bit-reproducible; with DP only in distribution: the same config and seed must
    not release the same noised payloads (otherwise the noise is a function of what the coordinator knows)."""
    plain_a, plain_b = runs["plain_a"].uplinks(), runs["plain_b"].uplinks()
    assert plain_a and len(plain_a) == len(plain_b)
    assert all(torch.equal(a.tensor("logits"), b.tensor("logits")) for a, b in zip(plain_a, plain_b, strict=True))
    dp_a, dp_b = runs["dp_a"].uplinks(), runs["dp_b"].uplinks()
    assert dp_a and len(dp_a) == len(dp_b)
    for a, b in zip(dp_a, dp_b, strict=True):
        assert (a.sender, a.round, a.kind) == (b.sender, b.round, b.kind)
        # The raw payloads are identical (seeded, non-private training) ...
        assert torch.equal(runs["dp_a"].raw[(a.sender, a.round, a.kind)], runs["dp_b"].raw[(b.sender, b.round, b.kind)])
        # ... so a difference between the releases is the difference of two independent noises.
        assert not torch.equal(a.tensor("logits"), b.tensor("logits")), f"{a.sender}: identical noise in two runs"


def test_two_releases_of_one_participant_in_one_round_do_not_share_noise(tmp_path: Path) -> None:
    """(c) Two different payloads of one participant in one round: with identical noise, their difference is
    the difference of the clipped payloads, exactly. It must carry the noise of both."""
    fed = Federation(tiny_config(**{**FAST, **PARTICIPANT_DP, "run": {"rounds": 3}}), tmp_path / "run",
                     progress=False)
    layer = fed.privacy.layer
    party = fed.parties[0]
    layer.start_round(1, [p.id for p in fed.parties])
    zeros, ones = torch.zeros(60, 10), torch.full((60, 10), 0.01)  # both inside the C-ball: clipping is identity

    def release(kind: str, logits: torch.Tensor) -> torch.Tensor:
        msg = Message(sender=party.id, receiver=AGGREGATOR, run_id=fed.run_id, round=1, kind=kind,
                      payload={"logits": logits})
        return layer.outbound(msg, party).tensor("logits")

    first, second = release("logits", zeros), release("logits_again", ones)
    std = fed.privacy.participants[party.id].noise_multiplier * 2 * CLIP
    residual = (second - first) - (ones - zeros)
    assert _rms(residual) > 0.3 * std, f"the two releases' noise cancels to {_rms(residual):.2e}"
    # Nor do two fields of one release: a mapping is noised field by field, each from a fresh key.
    from securefl.privacy.mechanisms import clip_and_noise

    both, _ = clip_and_noise({"a": torch.zeros(500), "b": torch.zeros(500)}, clip_norm=CLIP, noise_multiplier=1.0)
    assert _rms(both["a"] - both["b"]) > 0.3 * 2 * CLIP


def test_dp_sgd_sample_and_noise_are_not_predictable_from_the_seed() -> None:
    """(d) The host runs DP-SGD inside ``seeded(derive_seed(run.seed, "client_step", rnd, pid))``. If the Poisson
    sample and the noise came from torch's RNG, two fits under that context would take the same batches and
    end in the same model: the coordinator could replay the training and subtract the noise."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    torch.manual_seed(1)
    start = nn.Linear(5, 3)

    def fit() -> tuple[list[torch.Tensor], torch.Tensor]:
        model = copy.deepcopy(start)
        batches: list[torch.Tensor] = []

        def loss(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            batches.append(xb.detach().clone())
            return nn.functional.cross_entropy(m(xb), yb)

        trainer = DPSGDTrainer(noise_multiplier=1.0, max_grad_norm=1.0, commit=lambda event: None)
        with seeded(derive_seed(3, "client_step", 1, "p0")):
            # batch_size 2 of 64: q = 1/32, so some Poisson batches are empty (noise-only steps).
            trainer.fit(model, torch.optim.SGD(model.parameters(), lr=0.5), x, y, batch_size=2, steps=40,
                        batch_loss=loss)
        return batches, torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    (batches_a, theta_a), (batches_b, theta_b) = fit(), fit()
    same_sample = len(batches_a) == len(batches_b) and all(
        torch.equal(a, b) for a, b in zip(batches_a, batches_b, strict=True))
    assert not same_sample, "the Poisson sample is a function of the seed: amplification by sampling is void"
    assert not torch.equal(theta_a, theta_b), "the same seed gives the same noised model"


def test_fedgen_label_histogram_noise_is_not_predictable_from_the_seed(tmp_path: Path) -> None:
    """(e) FedGen's users release their label counts once, with Gaussian noise σ. If that noise came from
    ``ctx.generator("label-histogram", pid)``, the coordinator would subtract it and read the exact counts."""
    sigma = 2.0
    cfg = tiny_config(protocol="fedgen", privacy={"unit": "record", "histogram_noise_multiplier": sigma},
                      participants=[{"id": f"p{i}", "model": "mlp_s", "target_epsilon": 8.0} for i in range(3)],
                      run={"rounds": 1}, fedgen={"mode": "private"})
    fed = Federation(cfg, tmp_path / "run", progress=False)
    residuals = []
    for party in fed.parties:
        released = fed.protocol.released_label_counts(party)  # what the user uplinks as label_counts
        exact = party.train.label_counts(fed.ctx.num_classes).double()
        guessed = torch.randn(exact.shape, generator=_seeded_generator(cfg.run.seed, "label-histogram", party.id),
                              dtype=torch.float64)
        recovered = released.double() - sigma * guessed
        kept = released > 0  # clamped entries say less; score the attack where the release is unclamped
        residuals.append((recovered - exact)[kept])
    residual = torch.cat(residuals)
    assert residual.numel() >= 10
    assert _rms(residual) > 0.3 * sigma, f"the seed's noise, subtracted, gives the counts to {_rms(residual):.2e}"
    assert math.isfinite(_rms(residual))
