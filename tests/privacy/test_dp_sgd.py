"""The DP-SGD trainer: Poisson sampling, write-ahead commit, clipping, and public terms left unclipped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from securefl.core.training import LookAhead, PlainTrainer
from securefl.privacy.dp_sgd import DPSGDTrainer
from securefl.privacy.errors import BudgetExceeded
from securefl.privacy.events import PrivacyEvent, PublicDataEvent


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def test_one_event_per_call_committed_before_training_with_poisson_rate() -> None:
    events: list = []
    model = nn.Linear(5, 3)
    trainer = DPSGDTrainer(noise_multiplier=1.3, max_grad_norm=0.7, commit=events.append)
    x, y = _data(64)
    stats = trainer.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, batch_size=16, epochs=2,
                        payload="revisit")
    (event,) = events
    assert isinstance(event, PrivacyEvent)
    assert event.sample_rate == pytest.approx(16 / 64) and event.steps == 8 == stats.steps
    assert event.noise_multiplier == 1.3 and event.sensitivity == 0.7 and event.payload == "revisit"


def test_a_refused_commit_trains_nothing() -> None:
    model = nn.Linear(5, 3)
    before = [p.detach().clone() for p in model.parameters()]

    def refuse(event):  # type: ignore[no-untyped-def]
        raise BudgetExceeded("over budget", participant="p0", unit="record", epsilon_would_be=9.0, budget=8.0, delta=1e-5)

    trainer = DPSGDTrainer(noise_multiplier=1.0, max_grad_norm=1.0, commit=refuse)
    x, y = _data()
    with pytest.raises(BudgetExceeded):
        trainer.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, batch_size=16, epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_private_gradients_are_clipped_and_public_terms_are_not() -> None:
    x, y = _data(32)
    big = 1000.0

    def private_loss(model, xb, yb):  # type: ignore[no-untyped-def]
        return big * model(xb).sum() / len(xb)  # per-example gradient far above the clip bound

    def one_step(public: bool) -> float:
        model = nn.Linear(5, 3, bias=False)
        with torch.no_grad():
            model.weight.zero_()
        trainer = DPSGDTrainer(noise_multiplier=1e-6, max_grad_norm=1.0, commit=lambda e: None)
        torch.manual_seed(0)
        trainer.fit(model, torch.optim.SGD(model.parameters(), lr=1.0), x, y, batch_size=32, steps=1,
                    batch_loss=(lambda m, xb, yb: 0 * m(xb).sum()) if public else private_loss,
                    public_loss=(lambda m: big * m.weight.sum()) if public else None)
        return float(model.weight.detach().abs().max())

    # Clipped to norm 1 per example: the private step moves the weights by at most ~1.
    assert one_step(public=False) <= 1.01
    # The public term is added after clipping and noise, untouched: the step is the full 1000.
    assert one_step(public=True) == pytest.approx(big, rel=1e-3)


def test_combine_is_handed_the_noised_private_gradient_and_its_result_is_the_step() -> None:
    """PCGrad-style surgery stays post-processing only if it sees the gradient after clipping AND noise."""
    x, y = _data(32)
    seen: dict[str, torch.Tensor] = {}
    public_direction = torch.tensor([3.0, -1.0, 2.0, 0.5, 0.0, 1.0])

    def combine(g_private: torch.Tensor, g_public: torch.Tensor) -> torch.Tensor:
        seen["private"], seen["public"] = g_private.clone(), g_public.clone()
        return g_private + 2 * g_public

    model = nn.Linear(5, 1)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    # σ = 500 with clip 1: the clipped mean alone has norm <= 1, so a larger norm can only come from the noise.
    trainer = DPSGDTrainer(noise_multiplier=500.0, max_grad_norm=1.0, commit=lambda e: None)
    torch.manual_seed(0)
    trainer.fit(model, torch.optim.SGD(model.parameters(), lr=1.0), x, y, batch_size=32, steps=1,
                batch_loss=lambda m, xb, yb: m(xb).pow(2).mean(),
                public_loss=lambda m: (torch.cat([m.weight.reshape(-1), m.bias]) * public_direction).sum(),
                combine=combine)
    assert float(seen["private"].norm()) > 5.0
    torch.testing.assert_close(seen["public"], public_direction)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(before - after, seen["private"] + 2 * public_direction)


def _per_record_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row i: d/dθ of record i's squared error, by plain autograd (no Opacus)."""
    rows = []
    for xi, yi in zip(x, y, strict=True):
        loss = (model(xi[None]).squeeze() - yi).pow(2)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(rows)


def test_look_ahead_clips_each_records_two_gradients_as_one_vector() -> None:
    """FedH2L meta under DP: record i contributes v_i = (1 - β) ∇ℓ_i(θ) + β ∇ℓ_i(θ'), θ' = θ - α ∇public(θ), and
    DP-SGD clips v_i as a whole (sensitivity C, the same spend); the public gradient is added unclipped."""
    alpha, beta, clip = 1.0, 0.5, 3.0
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 5, generator=gen), 3 * torch.randn(8, generator=gen)
    direction = torch.tensor([1.0, -2.0, 0.5, 0.0, 1.5, -1.0])

    def public(m: nn.Module) -> torch.Tensor:
        flat = torch.cat([m.weight.reshape(-1), m.bias])
        return (flat * direction).sum() + 0.5 * flat.pow(2).sum()  # its gradient, direction + θ, moves with θ

    torch.manual_seed(1)
    model = nn.Linear(5, 1)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    g_public = direction + theta
    ahead = nn.Linear(5, 1)
    with torch.no_grad():
        ahead.weight.copy_((theta - alpha * g_public)[:5].view(1, 5))
        ahead.bias.copy_((theta - alpha * g_public)[5:])
    here, there = _per_record_grads(model, x, y), _per_record_grads(ahead, x, y)

    def clipped(v: torch.Tensor) -> torch.Tensor:
        return v * (clip / v.norm(dim=1, keepdim=True)).clamp(max=1.0)

    jointly = clipped((1 - beta) * here + beta * there).mean(0) + g_public
    separately = ((1 - beta) * clipped(here) + beta * clipped(there)).mean(0) + g_public
    assert float((jointly - separately).norm()) > 0.05 * float(jointly.norm())  # the test can tell them apart

    events: list = []
    trainer = DPSGDTrainer(noise_multiplier=1e-6, max_grad_norm=clip, commit=events.append)
    trainer.fit(model, torch.optim.SGD(model.parameters(), lr=1.0), x, y, batch_size=8, steps=1,
                batch_loss=lambda m, xb, yb: (m(xb).squeeze(1) - yb).pow(2).mean(), public_loss=public,
                lookahead=LookAhead(step=alpha, weight=beta))
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(theta - after, jointly, rtol=1e-4, atol=1e-4)
    (event,) = events  # one release, at the plain DP-SGD noise and rate
    assert (event.noise_multiplier, event.sample_rate, event.steps) == (1e-6, 1.0, 1)


def test_combine_needs_a_public_term() -> None:
    model = nn.Linear(5, 3)
    x, y = _data()
    trainer = DPSGDTrainer(noise_multiplier=1.0, max_grad_norm=1.0, commit=lambda e: None)
    with pytest.raises(ValueError, match="public_loss"):
        trainer.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, batch_size=16, epochs=1,
                    combine=lambda a, b: a)


def test_public_steps_are_logged_as_spending_nothing() -> None:
    events: list = []
    model = nn.Linear(5, 3)
    x, y = _data()
    DPSGDTrainer(noise_multiplier=1.0, max_grad_norm=1.0, commit=events.append).fit_public(
        model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, batch_size=16, epochs=1, payload="digest")
    assert len(events) == 1 and isinstance(events[0], PublicDataEvent) and events[0].payload == "digest"


def test_public_steps_train_exactly_as_the_plain_trainer_does() -> None:
    """Logging the public step is not enough: a DP ``fit_public`` that booked the event but skipped the training
    passed every other test. It must move the model, and exactly as the plain trainer would (no clipping, no
    noise: the data are public)."""
    x, y = _data()
    trained = {}
    for trainer in (PlainTrainer(), DPSGDTrainer(noise_multiplier=1.0, max_grad_norm=1.0, commit=lambda e: None)):
        torch.manual_seed(0)
        model = nn.Linear(5, 3)
        before = [p.detach().clone() for p in model.parameters()]
        stats = trainer.fit_public(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, batch_size=16, epochs=2)
        assert stats.steps == 8
        assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        trained[trainer.name] = [p.detach() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(trained["plain"], trained["dp_sgd"], strict=True))


def test_model_is_left_without_opacus_hooks() -> None:
    model = nn.Linear(5, 3)
    x, y = _data()
    DPSGDTrainer(noise_multiplier=1.0, max_grad_norm=1.0, commit=lambda e: None).fit(
        model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, batch_size=16, epochs=1)
    model(x).sum().backward()
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
