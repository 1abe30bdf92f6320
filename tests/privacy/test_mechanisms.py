"""Mechanisms clip and noise as their events claim, with fresh secret noise on every call and field."""

from __future__ import annotations

import math

import pytest
import torch

from securefl.privacy.mechanisms import (
    clip_and_noise,
    clip_payload,
    distributed_event,
    distributed_noise_share,
    gaussian_histogram,
    top_up_std,
)

N = 200_000  # samples for std estimates: relative std error ≈ 1/sqrt(2N) ≈ 0.16 %


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_clipping_bounds_the_norm(dtype: torch.dtype, scale: float) -> None:
    x = torch.randn(10_000, generator=gen(1), dtype=dtype) * scale
    clipped = clip_payload(x, clip_norm=0.5)
    norm = float(clipped.to(torch.float64).norm())
    assert norm <= 0.5
    if float(x.double().norm()) > 0.5:
        assert norm == pytest.approx(0.5, rel=1e-5)  # scaled, not zeroed
        assert torch.allclose(clipped / clipped.norm(), x / x.norm(), atol=1e-6)
    else:
        assert torch.equal(clipped, x)


def test_mapping_payload_is_clipped_jointly() -> None:
    payload = {"a": torch.full((100,), 3.0), "b": torch.full((50,), -4.0)}
    clipped = clip_payload(payload, clip_norm=1.0)
    total = math.sqrt(sum(float(t.double().pow(2).sum()) for t in clipped.values()))
    assert total <= 1.0 and set(clipped) == {"a", "b"}
    assert payload["a"][0] == 3.0  # input untouched


@pytest.mark.parametrize(("relation", "factor"), [("replace_one", 2.0), ("add_remove", 1.0)])
def test_clip_and_noise_std_and_event(relation: str, factor: float) -> None:
    clip, sigma = 0.7, 1.3
    noised, event = clip_and_noise(
        torch.zeros(N, dtype=torch.float64), clip_norm=clip, noise_multiplier=sigma, relation=relation
    )
    assert float(noised.std()) == pytest.approx(sigma * factor * clip, rel=0.02)
    assert abs(float(noised.mean())) < 0.02
    assert event.sensitivity == pytest.approx(factor * clip)
    assert (event.unit, event.mechanism, event.sample_rate, event.steps, event.relation) == (
        "participant",
        "gaussian",
        1.0,
        1,
        relation,
    )
    assert event.noise_multiplier == sigma and event.noise_std == pytest.approx(sigma * factor * clip)


def test_noise_is_fresh_for_every_call_and_every_field() -> None:
    x = torch.ones(1000)
    a, _ = clip_and_noise(x, clip_norm=1.0, noise_multiplier=1.0)
    b, _ = clip_and_noise(x, clip_norm=1.0, noise_multiplier=1.0)
    assert not torch.equal(a, b)  # the same input twice: independent noise, nothing to cancel
    both, _ = clip_and_noise({"u": torch.zeros(1000), "v": torch.zeros(1000)}, clip_norm=1.0, noise_multiplier=1.0)
    assert not torch.equal(both["u"], both["v"])
    assert abs(float(torch.corrcoef(torch.stack([both["u"], both["v"]]))[0, 1])) < 0.2


def test_a_seeded_generator_cannot_be_passed() -> None:
    # The run's seed is known to the coordinator: no mechanism takes its randomness from outside.
    with pytest.raises(TypeError, match="generator"):
        clip_and_noise(torch.ones(3), clip_norm=1.0, noise_multiplier=1.0,
                       generator=torch.Generator().manual_seed(0))  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(clip_norm=0.0), "clip_norm"),
        (dict(clip_norm=-1.0), "clip_norm"),
        (dict(noise_multiplier=0.0), "noise_multiplier"),
        (dict(noise_multiplier=float("nan")), "noise_multiplier"),
        (dict(relation="swap"), "relation"),
    ],
)
def test_bad_parameters_named(kwargs: dict, match: str) -> None:
    base = dict(clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match=match):
        clip_and_noise(torch.ones(3), **{**base, **kwargs})


def test_nan_payload_refused() -> None:
    with pytest.raises(ValueError, match="NaN"):
        clip_and_noise(torch.tensor([1.0, math.nan]), clip_norm=1.0, noise_multiplier=1.0)


def test_distributed_shares_sum_to_sigma_delta() -> None:
    n, clip, sigma = 4, 1.0, 1.5
    shares, events = [], []
    for _ in range(n):
        share, event = distributed_noise_share(
            torch.zeros(N, dtype=torch.float64),
            clip_norm=clip,
            noise_multiplier=sigma,
            n_contributors=n,
            relation="add_remove",
        )
        assert float(share.std()) == pytest.approx(sigma * clip / math.sqrt(n), rel=0.02)
        shares.append(share)
        events.append(event)
    total = torch.stack(shares).sum(0)
    assert float(total.std()) == pytest.approx(sigma * clip, rel=0.02)
    assert all(e == events[0] for e in events)
    assert events[0].noise_multiplier == sigma and events[0].sensitivity == clip


def test_distributed_dropouts_and_top_up() -> None:
    n, m, clip, sigma = 5, 3, 1.0, 2.0
    weaker = distributed_event(clip_norm=clip, noise_multiplier=sigma, relation="replace_one", n_planned=n, n_actual=m)
    assert weaker.noise_multiplier == pytest.approx(sigma * math.sqrt(m / n))
    assert weaker.sensitivity == 2 * clip
    # Survivors add their planned share plus a top-up: the sum carries σΔ again.
    delta_s = 2 * clip
    tau = top_up_std(noise_multiplier=sigma, sensitivity=delta_s, n_planned=n, n_actual=m)
    g = gen(9)
    total = sum(
        torch.randn(N, generator=g, dtype=torch.float64) * math.sqrt((sigma * delta_s) ** 2 / n + tau**2) for _ in range(m)
    )
    assert float(total.std()) == pytest.approx(sigma * delta_s, rel=0.02)


def test_histogram_sensitivity_one_and_noise() -> None:
    labels = torch.randint(0, 10, (500,), generator=gen(3))
    counts = torch.bincount(labels, minlength=10)
    neighbour = torch.bincount(labels[1:], minlength=10)  # one record removed
    assert float((counts - neighbour).double().norm()) == 1.0  # the sensitivity the event claims
    noised, event = gaussian_histogram(counts, noise_multiplier=2.0)
    assert noised.dtype == torch.float64 and noised.shape == counts.shape
    assert (event.sensitivity, event.relation, event.unit, event.payload) == (
        1.0,
        "add_remove",
        "record",
        "label_histogram",
    )
    big, _ = gaussian_histogram(torch.zeros(N, dtype=torch.long), noise_multiplier=2.0)
    assert float(big.std()) == pytest.approx(2.0, rel=0.02)
    with pytest.raises(ValueError, match="1-D"):
        gaussian_histogram(torch.zeros(2, 2), noise_multiplier=1.0)


def test_record_level_clip_and_noise_uses_the_ball_diameter() -> None:
    # One record can move a clipped payload anywhere in the C-ball: Δ = 2C even under add/remove.
    _, event = clip_and_noise(
        torch.ones(4), clip_norm=1.5, noise_multiplier=1.0, relation="add_remove", unit="record"
    )
    assert event.unit == "record" and event.sensitivity == 3.0
