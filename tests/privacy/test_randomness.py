"""SecureRandom: the right distributions, fresh keys, and no way to seed it."""

from __future__ import annotations

import inspect

import pytest
import torch

from securefl.privacy.randomness import SecureRandom

N = 200_000


def test_normal_has_the_asked_std_shape_and_dtype() -> None:
    x = SecureRandom().normal((N // 100, 100), std=2.5, dtype=torch.float64)
    assert x.shape == (N // 100, 100) and x.dtype == torch.float64
    assert float(x.mean()) == pytest.approx(0.0, abs=0.03)
    assert float(x.std()) == pytest.approx(2.5, rel=0.02)
    # Gaussian tails, not a uniform or a clipped shape: about 4.55 % beyond 2 std.
    assert float((x.abs() > 5.0).double().mean()) == pytest.approx(0.0455, abs=0.003)
    assert SecureRandom().normal((7,)).dtype == torch.float32 and SecureRandom().normal((0,)).numel() == 0


def test_uniform_and_poisson_sample() -> None:
    rng = SecureRandom()
    u = rng.uniform(N)
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.005
    idx = rng.poisson_sample(N, sample_rate=0.1)
    assert idx.dtype == torch.long and len(idx) == pytest.approx(0.1 * N, rel=0.03)
    assert torch.equal(idx, idx.unique())  # each record at most once, in order
    assert len(rng.poisson_sample(10, sample_rate=0.0)) == 0 and len(rng.poisson_sample(10, sample_rate=1.0)) == 10
    with pytest.raises(ValueError, match="sample_rate"):
        rng.poisson_sample(10, sample_rate=1.5)
    with pytest.raises(ValueError, match="std"):
        rng.normal((3,), std=float("nan"))


def test_every_instance_is_freshly_keyed_and_none_can_be_seeded() -> None:
    assert not torch.equal(SecureRandom().normal((64,)), SecureRandom().normal((64,)))
    rng = SecureRandom()
    assert not torch.equal(rng.normal((64,)), rng.normal((64,)))  # the stream moves on
    assert list(inspect.signature(SecureRandom).parameters) == []
