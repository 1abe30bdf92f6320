"""The plain trainer's joining of a private and a public gradient (the hooks FedH2L's PCGrad and meta use)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from securefl.core.training import LookAhead, PlainTrainer


def _one_sgd_step(**fit_kwargs):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.zeros(8, dtype=torch.long)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    PlainTrainer().fit(model, torch.optim.SGD(model.parameters(), lr=1.0), x, y, batch_size=8, steps=1,
                       batch_loss=lambda m, xb, yb: m(xb).pow(2).mean(), **fit_kwargs)
    return before - torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_without_combine_the_step_follows_the_sum_and_with_it_the_combination() -> None:
    public_direction = torch.tensor([1.0, -2.0, 0.0, 3.0, 1.0])
    public = lambda m: (torch.cat([m.weight.reshape(-1), m.bias]) * public_direction).sum()  # noqa: E731
    private_only = _one_sgd_step()
    summed = _one_sgd_step(public_loss=public)
    torch.testing.assert_close(summed, private_only + public_direction)
    seen = {}

    def keep_private_only(g_private: torch.Tensor, g_public: torch.Tensor) -> torch.Tensor:
        seen["public"] = g_public
        return g_private - g_public

    torch.testing.assert_close(_one_sgd_step(public_loss=public, combine=keep_private_only),
                               private_only - public_direction)
    torch.testing.assert_close(seen["public"], public_direction)


def test_combine_without_a_public_term_is_refused() -> None:
    with pytest.raises(ValueError, match="public_loss"):
        _one_sgd_step(combine=lambda a, b: a)


def test_look_ahead_splits_the_private_gradient_between_theta_and_the_point_stepped_along_the_public() -> None:
    alpha, beta = 0.3, 0.7
    public_direction = torch.tensor([1.0, -2.0, 0.0, 3.0, 1.0])

    def public(m: nn.Module) -> torch.Tensor:
        flat = torch.cat([m.weight.reshape(-1), m.bias])
        return (flat * public_direction).sum() + 0.5 * flat.pow(2).sum()

    got = _one_sgd_step(public_loss=public, lookahead=LookAhead(step=alpha, weight=beta))
    torch.manual_seed(0)  # the same model and data as _one_sgd_step, by hand
    model = nn.Linear(4, 1)
    x = torch.randn(8, 4)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    g_public = public_direction + theta

    def private_gradient(at: torch.Tensor) -> torch.Tensor:
        w = at.clone().requires_grad_()
        (g,) = torch.autograd.grad((x @ w[:4] + w[4]).pow(2).mean(), w)
        return g

    ahead = private_gradient(theta - alpha * g_public)
    # The private loss keeps total weight 1: (1 - beta) of it at theta, beta of it at theta'.
    expected = (1 - beta) * private_gradient(theta) + g_public + beta * ahead
    torch.testing.assert_close(got, expected)
    assert float((got - private_gradient(theta) - g_public).norm()) > 0.1  # the look-ahead term is there
    assert float((got - (private_gradient(theta) + g_public + beta * ahead)).norm()) > 0.1  # not weight 1 + beta


def test_look_ahead_weight_outside_zero_one_is_refused() -> None:
    with pytest.raises(ValueError, match="weight must be in \\[0, 1\\].*1.5"):
        LookAhead(step=0.1, weight=1.5)


def test_look_ahead_without_a_public_term_is_refused() -> None:
    with pytest.raises(ValueError, match="public_loss"):
        _one_sgd_step(lookahead=LookAhead(step=0.1, weight=1.0))
